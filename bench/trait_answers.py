"""Trait answers of one checkpoint: every trait's rows in one batch (``behavior.sample_trait_answers`` now) against
one batch per trait (the former path: each (adapter, trait) group of ``samples_per_question`` rows sampled alone),
side by side in one process, on the base model with a checkpoint's adapter applied, at the config's ``behavior``
settings (sampling dtype, temperature, max tokens, seed).

    python bench/trait_answers.py --model-dir results/models/smollm2-135m-instruct \
        --adapter results/finetune/smollm2-135m-instruct/medical-harmful/checkpoint-20

Prints the seconds of each path, the ratio and the tokens sampled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from traitmon.behavior import sample_rows, trait_answer_rows
from traitmon.config import load_config
from traitmon.models import load_model
from traitmon.settings import study_settings
from traitmon.traits import load_traits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--adapter", help="a checkpoint's adapter folder (omit: the base model)")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config.yaml"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="1: as a workflow job runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    settings = study_settings(config).behavior
    traits = load_traits(config["traits"], config.get("trait_dirs") or [])
    groups = [trait_answer_rows(name, trait, settings) for name, trait in traits.items()]
    dtype = settings.generation.dtype if settings.generation.dtype != "auto" else "float32"
    model, tok = load_model(args.model_dir, dtype, adapter=args.adapter)
    run = {"model": "bench", "perturbation": "bench", "step": 0}
    paths = {"baseline (one batch per trait)": lambda: [r for g in groups for r in sample_rows(model, tok, g, settings, run)],
             "new (the checkpoint's traits in one batch)": lambda: sample_rows(
                 model, tok, [r for g in groups for r in g], settings, run)}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, fn in paths.items():
            t0 = time.perf_counter()
            rows = fn()
            if repeat:
                seconds[name].append(time.perf_counter() - t0)
                tokens = sum(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows)
                print(f"{name}: {len(rows)} answers, {tokens} tokens in {seconds[name][-1]:.2f} s", flush=True)
    base, new = (float(np.median(v)) for v in seconds.values())
    print(f"ratio baseline / new: {base / new:.2f}x  ({len(groups)} traits, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
