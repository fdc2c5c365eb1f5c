"""capture.precision on a finished study: speed and drift of bf16 autocast against float32, side by side.

For the base model and every checkpoint adapter of ``--results`` (a results folder with ``models/``,
``finetune/`` and ``directions/``), the measurement set is captured twice on the same loaded model, float32
(the baseline) and under bf16 autocast, at the traits' chosen layers, and projected on the directions as the
drift table does it (per-prompt projection minus the base's, in units of the base model's spread, averaged over
prompts). Prints the capture seconds of each precision and their ratio, and how far the bf16 drift profiles are
from the float32 ones: largest and mean absolute difference, per-trait correlation over checkpoints, and each
trait's mean difference (a shift common to every checkpoint).

    python bench/capture_precision.py --results results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from traitmon.capture import capture, measurement_prompts
from traitmon.drift import drift_scale, load_directions
from traitmon.models import adapter_applied, load_model

PRECISIONS = ("fp32", "bf16")


def projections(model, tok, chats, reference, directions, precision: str) -> tuple[np.ndarray, float]:
    """Per-prompt projections ``(prompt, trait)`` at each trait's layer, and the capture's seconds."""
    layers = sorted({int(v) for v in directions.layer.values})
    t0 = time.perf_counter()
    acts = capture(model, tok, chats, [reference] * len(chats), layers, 16, precision=precision)["response_mean"]
    seconds = time.perf_counter() - t0
    return np.stack([acts[:, layers.index(int(layer))] @ vector for layer, vector in
                     zip(directions.layer.values, directions.direction.values)], axis=1), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default="results")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--per-trait-questions", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the workflow's jobs run with 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.results)
    directions = load_directions(sorted(root.glob(f"directions/{args.model}/*.zarr")), "response_mean")
    adapters = sorted(root.glob(f"finetune/{args.model}/*/checkpoint-*"))
    if not adapters:
        raise SystemExit(f"{root}/finetune/{args.model}: no checkpoints")
    _, chats, reference = measurement_prompts(args.per_trait_questions)
    model, tok = load_model(root / "models" / args.model, "float32")
    proj = {p: {} for p in PRECISIONS}
    seconds = dict.fromkeys(PRECISIONS, 0.0)
    for adapter in [None, *adapters]:
        with adapter_applied(model, adapter) as applied:
            for precision in PRECISIONS:
                proj[precision][adapter], s = projections(applied, tok, chats, reference, directions, precision)
                seconds[precision] += s
    drift = {}
    for precision, by_adapter in proj.items():
        base = by_adapter[None]
        drift[precision] = np.stack([((by_adapter[a] - base) / drift_scale(base)).mean(0) for a in adapters])
    diff = drift["bf16"] - drift["fp32"]
    traits = [str(t) for t in directions.trait.values]
    result = {
        "checkpoints": len(adapters), "prompts": len(chats), "threads": args.threads,
        "capture_s": seconds, "speedup": seconds["fp32"] / seconds["bf16"],
        "drift_fp32_sd_over_checkpoints": dict(zip(traits, drift["fp32"].std(0).round(3).tolist())),
        "max_abs_diff": float(np.abs(diff).max()), "mean_abs_diff": float(np.abs(diff).mean()),
        "corr": dict(zip(traits, [round(float(np.corrcoef(drift["fp32"][:, j], drift["bf16"][:, j])[0, 1]), 4)
                                  for j in range(len(traits))])),
        "mean_diff": dict(zip(traits, diff.mean(0).round(3).tolist())),
    }
    print(f"capture of {len(chats)} prompts x {len(adapters) + 1} models: fp32 {seconds['fp32']:.1f} s, "
          f"bf16 {seconds['bf16']:.1f} s: {result['speedup']:.2f}x")
    print(f"drift, bf16 - fp32 (base-spread units): largest {result['max_abs_diff']:.3f}, mean "
          f"{result['mean_abs_diff']:.3f}; per-trait correlation over checkpoints {min(result['corr'].values()):.4f}"
          f"-{max(result['corr'].values()):.4f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
