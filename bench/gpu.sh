#!/usr/bin/env bash
# The GPU figures of issue 13, one command (random weights: no download, no network; needs torch,
# transformers and peft only, not snakemake, zarr or gguf):
#   bash bench/gpu.sh                              # Llama-3-8B shape, bf16, one GPU (target: under 8 minutes)
#   bash bench/gpu.sh --shape tiny --device cpu    # smoke run (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
shape=llama3-8b; device=cuda; dtype=bfloat16
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}
if [ "$device" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; fi
case "$shape" in
  llama3-8b) ft="--batch 8 --seq 512 --steps 6 --rank 32" ;;
  *) ft="--batch 2 --seq 32 --steps 4 --rank 4" ;;
esac
echo "== capture, sampling, live check vs training step ($shape, $dtype, $device; load $(cut -d' ' -f1 /proc/loadavg))"
"$python" bench/gpu_bench.py --shape "$shape" --device "$device" --dtype "$dtype"
echo "== finetune step: traitmon vs plain peft"
# shellcheck disable=SC2086
"$python" bench/finetune_step.py --shape "$shape" --dtype "$dtype" $ft
