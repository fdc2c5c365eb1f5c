"""A traitmon finetune step against a plain peft training step on the same model and batch.

Plain peft: ``get_peft_model`` + ``loss.backward()`` + ``clip_grad_norm_`` + ``optimizer.step()`` in a bare loop.
traitmon: ``traitmon.finetune.finetune`` itself (``transformers.Trainer`` with traitmon's collator, seeded
sampler, per-step log and checkpoint callback, bf16 autocast), timed as the period between consecutive step
ends (data loading, collation, logging and callbacks included); same LoRA settings, micro-batch and length.

    python bench/finetune_step.py                      # CPU, SmolLM2 shape
    python bench/finetune_step.py --shape llama3-8b --batch 8 --seq 512 --dtype bfloat16   # GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from common import SHAPES, device_name, sync, timed
from transformers import TrainerCallback

from traitmon.finetune import autocast, finetune, lora_config
from traitmon.models import build_tiny_tokenizer
from traitmon.settings import FinetuneSettings, build, section_defaults


def settings_for(args) -> FinetuneSettings:
    # the schema's finetune defaults, with the benchmark's shape
    return build(FinetuneSettings, {
        **section_defaults("finetune"), "rank": args.rank, "alpha": 2 * args.rank, "rslora": True, "dropout": 0.0,
        "lr": 1e-4, "scheduler": "constant", "warmup_steps": 0, "max_steps": args.steps, "micro_batch": args.batch,
        "grad_accum": 1, "max_length": args.seq, "max_grad_norm": 1.0, "seed": 0, "checkpoint_every": args.steps,
        "precision": args.precision, "gradient_checkpointing": args.gc}, "bench settings")


class StepClock(TrainerCallback):
    """Wall time at each optimizer step's end (device synchronised)."""

    def __init__(self, device: torch.device):
        self.device, self.ends = device, []

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.ends.append(time.perf_counter())

    def median_period(self, skip: int) -> float:
        ends = self.ends[skip:-1]  # the last step's end comes after its checkpoint evaluation
        periods = sorted(b - a for a, b in itertools.pairwise(ends))
        return periods[len(periods) // 2]


def main() -> None:
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", help="base weights dtype")
    parser.add_argument("--precision", default="auto", help="auto/bf16 = bf16 autocast, fp32 = none")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    settings = settings_for(args)
    tok = build_tiny_tokenizer()  # byte-level: answers of --seq characters give --seq tokens

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        config = LlamaConfig(max_position_embeddings=4096, **{**SHAPES[args.shape], "vocab_size": len(tok)})
        with torch.device(device):
            LlamaForCausalLM(config).to(dtype).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)

        # Plain peft on the same weights, same batch shape.
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        if args.gc:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model = get_peft_model(model, lora_config(settings))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, len(tok), (args.batch, args.seq), device=device)

        def plain_step():
            optimizer.zero_grad(set_to_none=True)
            with autocast(settings, device):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

        plain = timed(plain_step, device, args.steps, warmup=2)
        plain_peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        model = optimizer = None  # free the plain run before ours
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        # traitmon's loop: rows whose answer alone fills --seq tokens.
        answer = "x" * (args.seq - 12)
        rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}] * 32
        clock = StepClock(device)
        finetune(model_dir, rows, rows[:2], [{"user": "q", "assistant": "a"}], settings, Path(tmp) / "run",
                 args.dtype, callbacks=[clock])
        ours = clock.median_period(skip=1)  # periods from step 2 on: warm-up steps 1-2 skipped, as for plain
        ours_peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None

    tokens = args.batch * args.seq
    result = {"device": device_name(device), "shape": args.shape, "dtype": args.dtype, "precision": args.precision,
              "batch": args.batch, "seq": args.seq, "rank": args.rank,
              "plain_peft_s_per_step": plain, "traitmon_s_per_step": ours,
              "plain_peft_tokens_per_s": tokens / plain, "traitmon_tokens_per_s": tokens / ours,
              "traitmon_overhead_vs_plain_peft": ours / plain - 1,
              "plain_peak_gb": plain_peak, "traitmon_peak_gb": ours_peak}
    print(f"plain peft: {plain:.3f} s/step ({tokens / plain:.0f} tokens/s)")
    print(f"traitmon:   {ours:.3f} s/step ({tokens / ours:.0f} tokens/s)")
    print(f"traitmon overhead vs plain peft: {result['traitmon_overhead_vs_plain_peft']:+.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
