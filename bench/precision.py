"""fp32 against bf16 on the machine this runs on, side by side, and what ``auto`` resolves to here.

Figures, each in float32 and in bfloat16:
- matmul: one 512x576 @ 576x1536 product (SmolLM2's MLP up-projection at 512 tokens), GFLOP/s;
- finetune step: a LoRA training step of the SmolLM2-135M shape (random weights, r 16, batch 4 x 160 tokens)
  with and without bf16 autocast, as ``finetune.precision`` bf16/fp32 train;
- capture batch: ``traitmon.capture.capture`` of 16 chats with a reply, every layer, as ``capture.precision``;
- sampling batch: ``traitmon.generate.generate_responses`` of 16 prompts x 24 new tokens (temperature 0.7) with
  the weights in float32 and in bfloat16, as ``behavior.generation.dtype``.
Each figure is the median of ``--repeats`` runs after one warm-up. On a CPU without native bf16 the bf16 model
figures take minutes: ``--skip-model-bf16`` leaves them out there.

    python bench/precision.py                 # the machine's own thread count
    python bench/precision.py --threads 1     # one core
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the figures, not progress bars

import torch
from common import SHAPES, timed

from traitmon.capture import capture
from traitmon.generate import generate_responses
from traitmon.models import build_tiny_tokenizer, compute_precision
from traitmon.precision import describe, resolve

CHATS = [[{"role": "user", "content": f"Question {i}: what should I do about my health worries this week?"}]
         for i in range(16)]
REPLY = "I understand. It is best to talk to a doctor, who can look at what is going on and advise you."


def matmul_gflops(dtype: str, repeats: int) -> float:
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    if dtype == "bf16":
        a, b = a.bfloat16(), b.bfloat16()
    seconds = timed(lambda: a @ b, torch.device("cpu"), repeats)
    return 2 * 512 * 576 * 1536 / seconds / 1e9


def smollm2_shape(dtype: torch.dtype, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **{**SHAPES["smollm2-135m"],
                                                                          "vocab_size": vocab})).to(dtype)


def train_step_seconds(precision: str, vocab: int, repeats: int) -> float:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(smollm2_shape(torch.float32, vocab), LoraConfig(
        r=16, lora_alpha=32, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (4, 160))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with compute_precision(precision, torch.device("cpu"), "bench"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return timed(step, torch.device("cpu"), repeats)


def capture_seconds(precision: str, tok, repeats: int) -> float:
    model = smollm2_shape(torch.float32, len(tok)).eval()
    layers = list(range(SHAPES["smollm2-135m"]["num_hidden_layers"] + 1))
    return timed(lambda: capture(model, tok, CHATS, [REPLY] * len(CHATS), layers, 16, precision=precision),
                 torch.device("cpu"), repeats)


def sampling_seconds(precision: str, tok, repeats: int) -> float:
    model = smollm2_shape(torch.bfloat16 if precision == "bf16" else torch.float32, len(tok)).eval()
    return timed(lambda: generate_responses(model, tok, CHATS, 24, 0.7, 16, 0, desc="bench"),
                 torch.device("cpu"), repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-model-bf16", action="store_true", help="matmul only in bf16 (a slow-bf16 CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tiny_tokenizer()
    machine = {**describe("cpu"), "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    print(json.dumps(machine))
    figures = {"matmul GFLOP/s": {p: matmul_gflops(p, args.repeats) for p in ("fp32", "bf16")}}
    print(f"matmul 512x576 @ 576x1536: fp32 {figures['matmul GFLOP/s']['fp32']:.1f} GFLOP/s, "
          f"bf16 {figures['matmul GFLOP/s']['bf16']:.1f} GFLOP/s", flush=True)
    stages = {"finetune step s": lambda p: train_step_seconds(p, len(tok), args.repeats),
              "capture batch s": lambda p: capture_seconds(p, tok, args.repeats),
              "sampling batch s": lambda p: sampling_seconds(p, tok, args.repeats)}
    for name, run in stages.items():
        figures[name] = {p: run(p) for p in ("fp32", "bf16") if p == "fp32" or not args.skip_model_bf16}
        ratio = figures[name]["fp32"] / figures[name]["bf16"] if "bf16" in figures[name] else float("nan")
        print(f"{name}: " + ", ".join(f"{p} {s:.2f}" for p, s in figures[name].items())
              + f"  (bf16 speed-up {ratio:.2f}x)", flush=True)
    chosen = {stage: resolve("auto", "cpu", stage) for stage in ("finetune", "capture", "sampling")}
    print(f"auto resolves to: {chosen}  ({machine['reason']})")
    print(json.dumps({"machine": machine, "figures": figures, "auto": chosen}))


if __name__ == "__main__":
    main()
