"""Capture throughput against a plain forward pass of the same batch.

Baseline: ``model.model(input_ids, attention_mask)`` (the decoder stack, as capture runs it; the LM head is
not needed for activations). Also shown: the full CausalLM forward and the ``output_hidden_states=True``
route. Capture = traitmon.capture.capture_batch pooling every layer (response mean + last prompt token).

    python bench/capture.py                       # CPU, SmolLM2 shape, fp32
    python bench/capture.py --shape llama3-8b --dtype bfloat16 --batch 32 --seq 256   # on a GPU
"""

from __future__ import annotations

import argparse
import json

import torch
from common import device_name, random_model, timed

from traitmon.capture import capture_batch
from traitmon.chat import ChatBatch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = random_model(args.shape, dtype, device)
    n_layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    attn = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, args.prompt_len:] = 1
    batch = ChatBatch(ids, attn, resp, torch.full((args.batch,), args.prompt_len - 1))
    tokens = args.batch * args.seq

    layers = list(range(n_layers + 1))
    variants = {
        "plain": lambda: model.model(input_ids=ids, attention_mask=attn, use_cache=False),
        "full": lambda: model(input_ids=ids, attention_mask=attn, use_cache=False),
        "hidden": lambda: model.model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=True),
        "capture": lambda: capture_batch(model, batch, layers),
        "capture4": lambda: capture_batch(model, batch, layers[: n_layers // 2 + 1][-4:]),
    }
    # Interleaved rounds, median per variant: CPU warm-up and frequency drift hit every variant alike.
    times = {name: [] for name in variants}
    with torch.no_grad():
        for name, fn in variants.items():
            timed(fn, device, 1, warmup=1)
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(timed(fn, device, 1, warmup=0))
    plain, full, hidden, cap, cap4 = (sorted(times[n])[len(times[n]) // 2] for n in variants)
    result = {
        "device": device_name(device), "shape": args.shape, "dtype": args.dtype, "batch": args.batch,
        "seq": args.seq, "tokens_per_s": {
            "plain_decoder_forward (baseline)": tokens / plain, "full_causal_lm_forward": tokens / full,
            "output_hidden_states_forward": tokens / hidden, "traitmon_capture_all_layers": tokens / cap,
            "traitmon_capture_4_middle_layers (early stop)": tokens / cap4},
        "capture_overhead_vs_plain_decoder": cap / plain - 1,
        "capture_vs_full_forward": cap / full - 1,
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    for name, value in result["tokens_per_s"].items():
        print(f"{name:48s} {value:10.0f} tokens/s")
    print(f"capture (all {n_layers + 1} layers) vs plain decoder forward: {result['capture_overhead_vs_plain_decoder']:+.1%}")
    print(f"capture vs full CausalLM forward: {result['capture_vs_full_forward']:+.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
