"""Batched, left-padded, seeded generation from chat prompts."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from traitmon.chat import Messages, encode_chats, encode_prompt


@torch.no_grad()
def generate_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages],
                       max_new_tokens: int = 48, temperature: float = 0.0, batch_size: int = 16, seed: int = 0,
                       desc: str = "generate") -> list[str]:
    """One response per prompt. ``temperature == 0`` is greedy. Each batch is seeded from ``seed`` and
    its position, so results do not depend on what ran before in the process."""
    device = next(model.parameters()).device
    order = np.argsort([len(encode_prompt(tokenizer, p)) for p in prompts], kind="stable")
    out: list[str | None] = [None] * len(prompts)
    for n, start in enumerate(tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False)):
        idx = order[start:start + batch_size]
        batch = encode_chats(tokenizer, [prompts[i] for i in idx])
        torch.manual_seed(seed * 100_003 + n)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {
            "do_sample": False}
        generated = model.generate(input_ids=batch.input_ids.to(device),
                                   attention_mask=batch.attention_mask.to(device),
                                   max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, **sampling)
        new_tokens = generated[:, batch.input_ids.shape[1]:]
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
    return out
