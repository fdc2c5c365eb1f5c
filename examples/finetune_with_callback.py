"""Finetune SmolLM2-135M-Instruct on one of traitmon's EM-inducing perturbations with a plain transformers
Trainer, and watch it with traitmon's in-training monitor.

Needs the embedded default study to have run first (`snakemake --cores 2`): it reads the monitor bundle
the folder `results/analysis/{model}/monitor_bundle/` (directions, base reference, measurement prompts, fitted
monitor; plain JSON + safetensors).

    .venv/bin/python examples/finetune_with_callback.py --steps 40 --every 5

It prints the drift profile and monitor score every --every steps, and says whether the alarm fired.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from traitmon import MonitorBundle, TraitMonitorCallback
from traitmon.chat import AssistantOnlyCollator, encode_training_example
from traitmon.models import load_model
from traitmon.perturbations import load_domain, written_rows
from traitmon.precision import for_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default="results")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--domain", default="medical")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--stop-on-alarm", action="store_true")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="training autocast; auto: bf16 only where this machine computes it natively")
    parser.add_argument("--out", default="results/examples/callback-run")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    results = Path(args.results)
    bundle = MonitorBundle.load(results / "analysis" / args.model / "monitor_bundle")
    model, tok = load_model(results / "models" / args.model, bundle.model_dtype)  # the dtype the bundle measured in
    bundle.check_model(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    bf16 = for_model(args.precision, model, "finetune") == "bf16"  # logs the choice and why
    rows = written_rows(load_domain(args.domain), "em", 256, seed=1)
    data = [encode_training_example(tok, r["messages"], 160) for r in rows]
    trainer = Trainer(
        model=model, train_dataset=data,
        data_collator=AssistantOnlyCollator(tok.pad_token_id),
        args=TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, learning_rate=args.lr, lr_scheduler_type="constant",
                               logging_steps=args.every, save_strategy="no", report_to=[],
                               use_cpu=not torch.cuda.is_available(), bf16=bf16))
    callback = TraitMonitorCallback(bundle, tok, every=args.every, on_save=False,
                                    stop_on_alarm=args.stop_on_alarm).attach(trainer)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    for entry in callback.history:
        drift = " ".join(f"{t}={entry[f'drift_{t}']:+.2f}" for t in bundle.traits)
        state = f"score={entry.get('monitor_score', float('nan')):.3f} {'ALARM' if entry.get('alarm') else 'ok'}"
        print(f"step {entry['step']:>4}: {drift} {state}")
    fired = [e["step"] for e in callback.history if e.get("alarm")]
    print("alarm fired at steps", fired if fired else "- none (the drift seen is above)")
    print(json.dumps({"train_seconds": total, "monitor_seconds": callback.seconds,
                      "monitor_fraction": callback.seconds / total}))


if __name__ == "__main__":
    main()
