"""Overhead of traitmon's in-training monitor: training time with TraitMonitorCallback vs without it.

A random-weight model of the given shape is trained with the transformers Trainer (LoRA r 16, all projections)
for --steps steps; the callback scores the 76-prompt measurement set every --every steps. Baseline: the same
training without the callback. Directions are random unit vectors (the cost does not depend on their values).

    python bench/callback_overhead.py                         # CPU, SmolLM2 shape
    python bench/callback_overhead.py --shape llama3-8b --batch 8 --seq 512 --every 50   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import SHAPES, device_name

from traitmon import MonitorBundle, TraitMonitorCallback
from traitmon.capture import measurement_prompts
from traitmon.models import build_tiny_tokenizer


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = build_tiny_tokenizer()
    traits = ["honesty", "helpfulness", "harmlessness", "power-seeking", "corrigibility", "sycophancy", "confidence"]
    ids, chats, reference = measurement_prompts(4)

    def train(with_callback: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        config = LlamaConfig(max_position_embeddings=4096, **{**SHAPES[args.shape], "vocab_size": len(tok)})
        model = LlamaForCausalLM(config).to(device)
        n_layers = config.num_hidden_layers
        layers = [n_layers // 2] * 7
        directions = np.random.default_rng(0).normal(size=(7, config.hidden_size)).astype(np.float32)
        bundle = MonitorBundle(model_key="bench", model_hash="", traits=list(traits), layers=layers,
                               directions=directions, prompt_ids=ids, chats=chats, reference=reference,
                               variant="response_mean", base_projection=np.zeros((len(ids), 7), np.float32))
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM", target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        row = [3 + i % 200 for i in range(args.seq)]  # byte-level vocabulary
        data = [{"input_ids": row, "labels": row}] * 64
        trainer = Trainer(model=model, train_dataset=data, args=TrainingArguments(
            output_dir="/tmp/traitmon-bench-callback", max_steps=args.steps, per_device_train_batch_size=args.batch,
            save_strategy="no", report_to=[], logging_steps=10_000, bf16=True, use_cpu=device.type == "cpu"),
            data_collator=lambda b: {k: torch.tensor([x[k] for x in b]) for k in ("input_ids", "labels")})
        callback = TraitMonitorCallback(bundle, tok, every=args.every, on_save=False).attach(trainer) \
            if with_callback else None
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start, callback.seconds if callback else 0.0

    plain, _ = train(False)
    watched, monitor_seconds = train(True)
    result = {"device": device_name(device), "shape": args.shape, "steps": args.steps, "every": args.every,
              "batch": args.batch, "seq": args.seq, "plain_train_s": plain, "with_callback_s": watched,
              "callback_s": monitor_seconds, "callbacks": args.steps // args.every,
              "callback_fraction_of_training": monitor_seconds / (watched - monitor_seconds),
              "wall_overhead_vs_plain": watched / plain - 1}
    print(f"plain training: {plain:.1f} s; with callback: {watched:.1f} s "
          f"({result['callbacks']} checks, {monitor_seconds:.1f} s in the callback)")
    print(f"callback time / training time: {result['callback_fraction_of_training']:.1%} at every {args.every} steps")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
