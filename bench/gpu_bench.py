"""The GPU figures of issue 13 in one process, on random weights of a model shape (no download, no network):
capture vs plain forward, answer sampling vs plain ``generate``, one live check vs one training step, peak
memory. Imports only torch, transformers, peft and traitmon's light modules (no zarr, snakemake, gguf,
pandas or xarray). ``bench/gpu.sh`` runs it with the finetune-step benchmark.

    PYTHONPATH=src:bench python bench/gpu_bench.py --shape llama3-8b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from common import SHAPES, device_name, sync, timed

from traitmon.bundle import MonitorBundle
from traitmon.capture import capture_batch
from traitmon.chat import encode_chats
from traitmon.generate import generate_responses
from traitmon.models import build_tiny_tokenizer

SIZES = {  # batch and lengths per shape: the reference's 8B figures, small ones for a CPU smoke run
    "llama3-8b": {"fwd_batch": 32, "fwd_seq": 256, "gen_batch": 64, "gen_new": 256, "prompts": 64,
                  "train_batch": 8, "train_seq": 512, "check_prompts": 76, "repeats": 3},
    "smollm2-135m": {"fwd_batch": 8, "fwd_seq": 96, "gen_batch": 16, "gen_new": 16, "prompts": 16,
                     "train_batch": 2, "train_seq": 128, "check_prompts": 16, "repeats": 1},
    "tiny": {"fwd_batch": 4, "fwd_seq": 32, "gen_batch": 4, "gen_new": 8, "prompts": 8,
             "train_batch": 2, "train_seq": 32, "check_prompts": 8, "repeats": 1},
}


def random_model(shape: str, vocab: int, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **{**SHAPES[shape], "vocab_size": vocab})
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def chats(n: int, chars: int) -> list[list[dict]]:
    return [[{"role": "user", "content": (f"question {i}: " + "why " * chars)[:chars]}] for i in range(n)]


def bench_capture(model, tok, s: dict, device) -> dict:
    batch = encode_chats(tok, chats(s["fwd_batch"], s["fwd_seq"] // 2), ["a " * (s["fwd_seq"] // 4)] * s["fwd_batch"])
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    layers = list(range(model.config.num_hidden_layers + 1))
    with torch.no_grad():
        plain = timed(lambda: model(input_ids=ids, attention_mask=mask), device, s["repeats"])
        ours = timed(lambda: capture_batch(model, batch, layers), device, s["repeats"])
    tokens = int(mask.sum())
    return {"plain_forward_tokens_per_s": tokens / plain, "capture_tokens_per_s": tokens / ours,
            "capture_vs_plain_forward": plain / ours}


def bench_sampling(model, tok, s: dict, device) -> dict:
    prompts = chats(s["prompts"], 48)
    batch = encode_chats(tok, prompts[: s["gen_batch"]])

    def plain():  # plain transformers generate, today's default batch of 16
        for start in range(0, len(prompts), 16):
            b = encode_chats(tok, prompts[start:start + 16])
            model.generate(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                           max_new_tokens=s["gen_new"], min_new_tokens=s["gen_new"], do_sample=True,
                           temperature=0.7, top_p=1.0, pad_token_id=tok.pad_token_id)

    def ours():  # traitmon's sampling path at the bench's batch
        generate_responses(model, tok, prompts, s["gen_new"], 0.7, s["gen_batch"], seed=0, desc="bench")

    del batch
    t_plain = timed(plain, device, 1, warmup=0)
    t_ours = timed(ours, device, 1, warmup=0)
    new_tokens = len(prompts) * s["gen_new"]
    return {"plain_generate_new_tokens_per_s": new_tokens / t_plain, "traitmon_sampling_s": t_ours,
            "plain_generate_s": t_plain, "sampling_vs_plain_generate": t_plain / t_ours}


def bench_check_vs_step(model, tok, s: dict, device) -> dict:
    from peft import LoraConfig, get_peft_model

    n_traits = 7
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(n_traits, model.config.hidden_size)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    depth = model.config.num_hidden_layers
    bundle = MonitorBundle("random", "none", [f"t{i}" for i in range(n_traits)],
                           [max(1, depth * (i + 3) // 10) for i in range(n_traits)], directions,
                           [str(i) for i in range(s["check_prompts"])], chats(s["check_prompts"], 60),
                           "I would answer carefully and honestly. " * 3, "response_mean",
                           np.zeros((s["check_prompts"], n_traits), np.float32), batch_size=16)
    peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, len(tok), (s["train_batch"], s["train_seq"]), device=device)
    peft_model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    t_step = timed(step, device, s["repeats"])
    t_check = timed(lambda: bundle.project(peft_model, tok), device, s["repeats"])
    return {"train_step_s": t_step, "live_check_s": t_check, "live_check_in_steps": t_check / t_step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device, dtype, s = torch.device(args.device), getattr(torch, args.dtype), SIZES[args.shape]
    tok = build_tiny_tokenizer()  # byte-level: lengths in characters are lengths in tokens
    model = random_model(args.shape, len(tok), dtype, device)
    result = {"device": device_name(device), "shape": args.shape, "dtype": args.dtype}
    for name, fn in (("capture", bench_capture), ("sampling", bench_sampling), ("check", bench_check_vs_step)):
        part = fn(model, tok, s, device)
        sync(device)
        result.update(part)
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in part.items()), flush=True)
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        print(f"peak memory: {result['peak_memory_gb']:.1f} GB")
    result["load_average"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
