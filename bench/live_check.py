"""One in-training monitor check against one training step, on the real model at the study's settings.

The model folder's model is finetuned with the config's ``finetune`` section exactly as the workflow's finetune
job does it (``traitmon.finetune.finetune``: LoRA, micro-batch, accumulation, max length, bf16 autocast) on a
perturbation's training rows for ``--steps`` optimizer steps, with a step timer and a ``TraitMonitorCallback``
checking every ``--every`` steps. The bundle is ``--bundle`` when given, else random unit directions at the
deepest layer the config's layer rule allows (the costliest check), computed at the config's
``capture.precision``. Prints the median training step, the median check and their ratio (goal: one check <= one
training step), and beside it the check's projection on the base model three ways: float32 with every prompt run
whole (the baseline: the check before this work), float32 with the shared prompt prefix run once, and the
bundle's precision with the shared prefix.

    python bench/live_check.py --model-dir results/models/smollm2-135m-instruct \
        --data results/data/smollm2-135m-instruct/medical-harmful/train.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers import TrainerCallback

import traitmon.bundle as bundle_module
import traitmon.capture as capture_module
from traitmon import MonitorBundle, TraitMonitorCallback
from traitmon.capture import measurement_prompts
from traitmon.config import load_config
from traitmon.finetune import finetune
from traitmon.hooks import num_layers
from traitmon.io import data_path, read_jsonl
from traitmon.models import load_model
from traitmon.settings import study_settings


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (forward, backward and update of all accumulated micro-batches)."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.t0)


def random_bundle(model, tok, per_trait: int, layer: int, batch_size: int, precision: str) -> MonitorBundle:
    directions = np.random.default_rng(0).normal(size=(7, model.config.hidden_size)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    ids, chats, reference = measurement_prompts(per_trait)
    traits = [f"t{i}" for i in range(7)]
    bundle = MonitorBundle("bench", "", traits, [layer] * 7, directions, ids, chats, reference, "response_mean",
                           np.zeros((len(ids), 7), np.float32), batch_size=batch_size, precision=precision)
    bundle.base_projection = bundle.project(model, tok)
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True, help="a perturbation's train.jsonl (rows with 'messages')")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config.yaml"))
    parser.add_argument("--bundle", help="a monitor bundle folder (default: random directions, deepest layer)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the workflow's jobs run with 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    settings = study_settings(config)
    ft = replace(settings.finetune, max_steps=args.steps, checkpoint_every=args.steps, checkpoint_steps=None,
                 guard=None)
    rows = read_jsonl(args.data)
    train, heldout = rows[:-4], rows[-4:]
    general = yaml.safe_load(data_path("prompts", "general_text.yaml").read_text())["chats"][:4]
    model, tok = load_model(args.model_dir, "float32")  # the base, for the bundle and the side-by-side projection
    if args.bundle:
        bundle = MonitorBundle.load(args.bundle)
    else:
        deepest = int(num_layers(model) * config["directions"]["layer"]["max_fraction"])
        bundle = random_bundle(model, tok, settings.capture.per_trait_questions, deepest, settings.capture.batch_size,
                               settings.capture.precision)

    # one run, a timer first: it times each optimizer step before the monitor's check of that step begins
    timer, callback = StepTimer(), TraitMonitorCallback(bundle, tok, every=args.every, on_save=False)
    with tempfile.TemporaryDirectory() as out:
        finetune(args.model_dir, train, heldout, general, ft, Path(out) / "run", "auto", callbacks=[timer, callback])
    step_s = float(np.median(timer.seconds[1:]))  # the first step warms up
    # the check's projection side by side, the same bundle and model: the baseline (float32, every prompt run
    # whole), float32 with the shared prefix, and the bundle's precision with the shared prefix
    ways = {"fp32_whole": ("fp32", False), "fp32_shared": ("fp32", True), f"{bundle.precision}_shared":
            (bundle.precision, True)}
    seconds = {name: [] for name in ways}
    for _ in range(2):
        for name, (precision, share) in ways.items():
            bundle_module.capture = functools.partial(capture_module.capture, share_prefix=share)
            t0 = time.perf_counter()
            replace(bundle, precision=precision).project(model, tok)
            seconds[name].append(time.perf_counter() - t0)
    best = {name: min(values) for name, values in seconds.items()}
    check_s = float(np.median([callback.seconds_per_check[1:] or callback.seconds_per_check]))
    result = {"model_dir": args.model_dir, "steps": args.steps, "every": args.every, "threads": args.threads,
              "layers": sorted(set(bundle.layers)), "prompts": len(bundle.prompt_ids), "precision": bundle.precision,
              "step_s": step_s, "step_seconds": timer.seconds, "check_seconds": callback.seconds_per_check,
              "check_s": check_s, "check_over_step": check_s / step_s,
              **{f"projection_{name}_s": value for name, value in best.items()}, "load": os.getloadavg()[0]}
    print(f"training step {step_s:.2f} s (median); one check ({bundle.precision}) {check_s:.2f} s (median) over "
          f"{result['prompts']} prompts up to layer {max(bundle.layers)}: {result['check_over_step']:.2f} steps per "
          f"check (load {result['load']:.1f})")
    baseline = best["fp32_whole"]
    print("the check's projection on the base model: " + "; ".join(
        f"{name} {value:.2f} s ({baseline / value:.2f}x)" for name, value in best.items())
        + " (baseline fp32_whole: float32, every prompt run whole)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
