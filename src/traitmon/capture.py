"""Teacher-forced hidden-state capture: per prompt and layer, the last prompt token and the mean over
response tokens. Shared by direction extraction, checkpoint capture and the live monitor.

Only the decoder stack runs (no LM head), pooling happens inside the hooks so no full
``[layers, batch, seq, hidden]`` tensor is ever kept, and the forward pass stops after the deepest
requested layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from traitmon.chat import (
    ChatBatch,
    Messages,
    encode_chats,
    encode_prompt,
    encode_response,
    shared_prefix_length,
)
from traitmon.hooks import find_decoder, num_layers, record_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer: the rest of the stack is not needed."""


MIN_SHARED_PREFIX = 8  # shorter shared prefixes are not worth a separate forward pass


@dataclass
class SharedPrefix:
    """Key/value cache of the token prefix every prompt of a capture starts with (system prompt, headers), run
    once (batch 1, up to the deepest requested layer) and reused by every batch: the template's tokens are a
    quarter of SmolLM2's measurement set. Hidden states of later tokens equal a full pass up to float rounding."""

    length: int
    cache: object  # transformers Cache

    def for_batch(self, batch_size: int):
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch_size)
        return cache


def cache_argument(decoder: torch.nn.Module, cache) -> dict:
    """The cache as the decoder's forward takes it: ``cache`` in recent transformers, ``past_key_values`` before."""
    import inspect

    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return {name: cache}


@torch.no_grad()
def run_prefix(model: PreTrainedModel, ids: list[int], deepest: int) -> SharedPrefix:
    """Run ``ids`` through the decoder with a cache, stopping after hidden_states index ``deepest``."""
    from transformers import DynamicCache

    decoder = find_decoder(model)
    device = next(model.parameters()).device
    cache = DynamicCache(config=decoder.config)

    def stop(index: int, _hidden: torch.Tensor) -> None:
        if index == deepest:
            raise _StopForward

    with record_layers(model, [deepest] if deepest < num_layers(model) else [], stop):
        try:
            decoder(input_ids=torch.tensor([ids], device=device), use_cache=True, **cache_argument(decoder, cache))
        except _StopForward:
            pass
    return SharedPrefix(len(ids), cache)


@torch.no_grad()
def capture_batch(model: PreTrainedModel, batch: ChatBatch, layers: list[int],
                  prefix: SharedPrefix | None = None) -> dict[str, torch.Tensor]:
    """Pooled hidden states ``{'response_mean', 'last_prompt'}``, each ``[batch, len(layers), hidden]`` float32.

    With ``prefix``, ``batch`` holds the rows without it, right-padded
    (``encode_chats(..., skip=prefix.length, right_pad=True)``).
    Rows without response tokens get NaN for ``response_mean``.
    """
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    attn = batch.attention_mask.to(device)
    resp = batch.response_mask.to(device).unsqueeze(-1).float()
    n_resp = resp.sum(1)
    rows = torch.arange(input_ids.shape[0], device=device)
    last = batch.last_prompt.to(device)
    position = {layer: j for j, layer in enumerate(layers)}
    hidden_size = find_decoder(model).config.hidden_size
    out_mean = torch.full((len(rows), len(layers), hidden_size), float("nan"))
    out_last = torch.empty((len(rows), len(layers), hidden_size))
    deepest = max(layers)
    stop_early = deepest < num_layers(model)

    def pool(index: int, hidden: torch.Tensor) -> None:
        j = position[index]
        h = hidden.float()
        out_last[:, j] = h[rows, last].cpu()
        out_mean[:, j] = ((h * resp).sum(1) / n_resp.clamp(min=1)).cpu()
        if stop_early and index == deepest:
            raise _StopForward

    decoder = find_decoder(model)
    # left padding: real tokens start at position 0 in every row, as when each prompt runs alone. After a shared
    # prefix the rows are right-padded, so each continues its prefix without a gap (sliding-window attention
    # measures distance in cache slots)
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    extra = {"use_cache": False}
    if prefix is not None:
        position_ids = position_ids + prefix.length
        attn = torch.cat([torch.ones((len(rows), prefix.length), dtype=attn.dtype, device=device), attn], dim=1)
        extra = {"use_cache": True, **cache_argument(decoder, prefix.for_batch(len(rows)))}
    with record_layers(model, layers, pool):
        try:
            decoder(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, **extra)
        except _StopForward:
            pass
    out_mean[(n_resp.squeeze(-1) == 0).cpu()] = float("nan")
    return {"response_mean": out_mean, "last_prompt": out_last}


def capture(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages],
            responses: list[str] | None, layers: list[int],
            batch_size: int = 16, max_length: int | None = None, desc: str = "capture",
            share_prefix: bool = True, precision: str = "fp32") -> dict[str, np.ndarray]:
    """Capture pooled activations for many chats, in length-sorted batches (less padding), input order kept.
    The token prefix all prompts share is run once (``SharedPrefix``) unless ``share_prefix`` is false.
    ``precision`` (``capture.precision``): ``bf16`` runs the passes under bfloat16 autocast
    (``traitmon.models.compute_precision``); the pooled values are float32 either way."""
    from traitmon.models import compute_precision

    with compute_precision(precision, next(model.parameters()).device):
        return _capture(model, tokenizer, prompts, responses, layers, batch_size, max_length, desc, share_prefix)


def _capture(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages],
             responses: list[str] | None, layers: list[int], batch_size: int, max_length: int | None, desc: str,
             share_prefix: bool) -> dict[str, np.ndarray]:
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    lengths = [len(ids) + (len(encode_response(tokenizer, responses[i])) if responses else 0)
               for i, ids in enumerate(prompt_ids)]
    shared = min(shared_prefix_length(prompt_ids), min(len(ids) for ids in prompt_ids) - 1) if prompts else 0
    if max_length is not None:
        shared = min(shared, max_length - 1)
    prefix = (run_prefix(model, prompt_ids[0][:shared], max(layers))
              if share_prefix and shared >= MIN_SHARED_PREFIX and max(layers) > 0 else None)
    order = np.argsort(lengths, kind="stable")
    results = {"response_mean": [None] * len(prompts), "last_prompt": [None] * len(prompts)}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start:start + batch_size]
        batch = encode_chats(tokenizer, [prompts[i] for i in idx],
                             [responses[i] for i in idx] if responses is not None else None, max_length,
                             skip=prefix.length if prefix else 0, right_pad=prefix is not None)
        pooled = capture_batch(model, batch, layers, prefix)
        for key, values in pooled.items():
            for row, i in enumerate(idx):
                results[key][i] = values[row].numpy()
    return {key: np.stack(values) for key, values in results.items()}


def measurement_prompts(per_trait: int) -> tuple[list[str], list[Messages], str]:
    """The fixed, versioned prompt set measured at every checkpoint: the first ``per_trait`` evaluation
    questions of each built-in trait listed in ``measurement.yaml``, then its general and EM-probe questions.
    It does not depend on the study's traits (a new trait is projected on captures that exist).
    Returns (ids, chats, reference_response)."""
    import yaml

    from traitmon.io import data_path
    from traitmon.traits import BUILTIN_TRAIT_DIR, load_trait

    data = yaml.safe_load(data_path("prompts", "measurement.yaml").read_text())
    ids, chats = [], []
    for name in data["trait_questions_from"]:
        trait = load_trait(BUILTIN_TRAIT_DIR / f"{name}.yaml")
        for i, question in enumerate(trait.evaluation_questions[:per_trait]):
            ids.append(f"{name}/{i:02d}")
            chats.append([{"role": "user", "content": question}])
    for group in ("general", "em_probe"):
        for i, question in enumerate(data[group]):
            ids.append(f"{group}/{i:02d}")
            chats.append([{"role": "user", "content": question}])
    return ids, chats, data["reference_response"].strip()


def measurement_version() -> int:
    """The measurement set's version (stored with every capture, so stores of different sets never mix)."""
    import yaml

    from traitmon.io import data_path

    return int(yaml.safe_load(data_path("prompts", "measurement.yaml").read_text())["version"])


def capture_dataset(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[str],
                    chats: list[Messages], reference: str | None,
                    layers: list[int] | None, batch_size: int, store_dtype: str, attrs: dict,
                    precision: str = "fp32"):
    """Capture the measurement set as an xarray Dataset with dims ``(prompt, layer, hidden)``; the attrs record
    the compute ``precision``."""
    import xarray as xr

    from traitmon.precision import for_model

    precision = for_model(precision, model, "capture")  # the store records what ran, never "auto"
    layers = list(range(num_layers(model) + 1)) if layers is None else list(layers)
    responses = [reference] * len(chats) if reference else None
    pooled = capture(model, tokenizer, chats, responses, layers, batch_size, desc=attrs.get("label", "capture"),
                     precision=precision)
    dtype = np.dtype(store_dtype)
    data = {key: (("prompt", "layer", "hidden"), values.astype(dtype)) for key, values in pooled.items()
            if key == "last_prompt" or reference}
    return xr.Dataset(data, coords={"prompt": ids, "layer": layers,
                                    "question": ("prompt", [c[-1]["content"] for c in chats])},
                      attrs={**attrs, "reference_response": reference or "", "stored_dtype": str(dtype),
                             "precision": precision})
