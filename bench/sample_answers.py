"""Answer sampling: today's path (the named baseline, a verbatim copy of the loop behavior.sample_answers ran
before issue 13: fp32 weights, HF multinomial sampling, the batch of 27 the config had then) against the new
default (bf16 sampling dtype, top-k draw in ``TopKSampler``, the config's batch), side by side in one process on
SmolLM2-135M-Instruct at the config's ``behavior`` settings (same 54 prompts, answers, max tokens, temperature).

    python bench/sample_answers.py --model-dir results/models/smollm2-135m-instruct
    python bench/sample_answers.py --model-dir ... --rows 16     # a subset of the 54 rows (a loaded machine)
    python bench/sample_answers.py --model-dir ... --batch-size 40   # another batch for the new path

Prints new tokens/s of each path (tokens of the decoded answers) and the ratio, with the load average.
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

from traitmon.behavior import answer_chats, em_answer_rows, trait_answer_rows
from traitmon.chat import encode_chats, encode_prompt
from traitmon.config import load_config
from traitmon.generate import generate_responses
from traitmon.models import load_model
from traitmon.settings import study_settings
from traitmon.traits import load_traits

BASELINE_BATCH = 27  # behavior.batch_size of config.yaml when issue 13 was filed


@torch.no_grad()
def baseline_responses(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed) -> list[str]:
    """The generation loop as it was before issue 13 (generate.generate_responses at the base commit)."""
    device = next(model.parameters()).device
    order = np.argsort([len(encode_prompt(tokenizer, p)) for p in prompts], kind="stable")
    out: list[str | None] = [None] * len(prompts)
    for n, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        batch = encode_chats(tokenizer, [prompts[i] for i in idx])
        torch.manual_seed(seed * 100_003 + n)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {
            "do_sample": False}
        generated = model.generate(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                   max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, **sampling)
        new_tokens = generated[:, batch.input_ids.shape[1]:]
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config.yaml"))
    parser.add_argument("--rows", type=int, help="sample only the first N answer rows")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="the new path's batch (default: the config's)")
    args = parser.parse_args()
    config = load_config(args.config)
    settings = study_settings(config).behavior
    traits = load_traits(config["traits"])
    rows = em_answer_rows(settings) + [r for name, trait in traits.items() for r in trait_answer_rows(name, trait, settings)]
    prompts = answer_chats(rows)[: args.rows]
    gen = (settings.max_new_tokens, settings.temperature, args.batch_size or settings.batch_size, settings.seed)
    baseline_gen = (settings.max_new_tokens, settings.temperature, BASELINE_BATCH, settings.seed)
    fp32, tok = load_model(args.model_dir, "float32")
    bf16, _ = load_model(args.model_dir, "bfloat16")
    paths = {"baseline (fp32, old loop)": lambda: baseline_responses(fp32, tok, prompts, *baseline_gen),
             "new (bf16, generate_responses)": lambda: generate_responses(bf16, tok, prompts, *gen, desc="bench")}
    rates = {}
    for name, fn in paths.items():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            answers = fn()
            seconds = time.perf_counter() - t0
            tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
            rates.setdefault(name, []).append(tokens / seconds)
            print(f"{name}: {len(prompts)} answers, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} "
                  f"tokens/s (load average {os.getloadavg()[0]:.1f})", flush=True)
    base, new = (float(np.median(v)) for v in rates.values())
    print(f"ratio new / baseline: {new / base:.2f}x  ({torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
