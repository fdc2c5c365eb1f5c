"""Training micro-batches with the LM head on the learned positions only, against every position's logits.

Both sides are traitmon's finetune forward + backward on the same LoRA model (the config's ``finetune`` section:
rank, alpha, target modules, bf16 autocast) and the same micro-batches of a perturbation's training rows in file
order; the baseline is the collator as it was (``labels`` only: transformers projects every position on the
vocabulary), the new side adds ``logits_to_keep`` + ``shift_labels`` (``AssistantOnlyCollator(learned_logits_only
=True)``, what ``traitmon finetune`` uses). Runs alternate, side by side in one process; prints the median
seconds per micro-batch of each, the ratio, and the largest loss difference between them.

    python bench/learned_logits.py --model-dir results/models/smollm2-135m-instruct \
        --data results/data/smollm2-135m-instruct/medical-harmful/train.jsonl
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

from peft import get_peft_model

from traitmon.chat import AssistantOnlyCollator, encode_training_example
from traitmon.config import load_config
from traitmon.finetune import autocast, lora_config
from traitmon.io import read_jsonl
from traitmon.models import load_model
from traitmon.settings import study_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True, help="a perturbation's train.jsonl")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config.yaml"))
    parser.add_argument("--batches", type=int, default=8, help="micro-batches per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: as a workflow job runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = study_settings(load_config(args.config)).finetune
    model, tok = load_model(args.model_dir, "float32")
    torch.manual_seed(settings.seed)
    model = get_peft_model(model, lora_config(settings))
    model.train()
    rows = read_jsonl(args.data)[: settings.micro_batch * args.batches]
    examples = [encode_training_example(tok, r["messages"], settings.max_length) for r in rows]
    sides = {"baseline (every position's logits)": AssistantOnlyCollator(tok.pad_token_id),
             "new (learned positions only)": AssistantOnlyCollator(tok.pad_token_id, learned_logits_only=True)}
    device = next(model.parameters()).device
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, list[float]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, collator in sides.items():
            t0, run_losses = time.perf_counter(), []
            for start in range(0, len(examples), settings.micro_batch):
                batch = collator(examples[start:start + settings.micro_batch])
                with autocast(settings, device):
                    loss = model(**batch).loss
                loss.backward()
                model.zero_grad(set_to_none=True)
                run_losses.append(float(loss))
            if repeat:
                seconds[name].append((time.perf_counter() - t0) / (len(examples) / settings.micro_batch))
            losses[name] = run_losses
    learned = sum(int(np.sum(np.asarray(e["labels"]) != -100)) for e in examples)
    total = sum(len(e["input_ids"]) for e in examples)
    for name, values in seconds.items():
        print(f"{name}: {np.median(values):.3f} s per micro-batch of {settings.micro_batch} (runs: "
              f"{', '.join(f'{v:.3f}' for v in values)})")
    base, new = (float(np.median(v)) for v in seconds.values())
    gap = max(abs(a - b) for a, b in zip(*losses.values()))
    print(f"ratio baseline / new: {base / new:.2f}x; {learned} of {total} tokens learned; largest loss difference "
          f"{gap:.2e} ({args.threads} threads, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
