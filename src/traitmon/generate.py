"""Batched, left-padded, seeded generation from chat prompts."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from traitmon.chat import Messages, encode_chats, encode_prompt
from traitmon.errors import TraitmonError


@torch.no_grad()
def generate_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages],
                       max_new_tokens: int = 48, temperature: float = 0.0, batch_size: int = 16, seed: int = 0,
                       desc: str = "generate", precision: str = "fp32") -> list[str]:
    """One response per prompt. ``temperature == 0`` is greedy; above it, ``TopKSampler`` draws each token (the
    distribution of ``generate(do_sample=True)``). Each batch draws from its own generator, seeded from ``seed``
    and the batch's position, so results do not depend on what ran before in the process. ``precision`` ``bf16``
    decodes under bfloat16 autocast (``traitmon.models.compute_precision``)."""
    from traitmon.models import compute_precision

    with compute_precision(precision, next(model.parameters()).device):
        return _generate(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed, desc)


def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages],
              max_new_tokens: int, temperature: float, batch_size: int, seed: int, desc: str) -> list[str]:
    device = next(model.parameters()).device
    order = np.argsort([len(encode_prompt(tokenizer, p)) for p in prompts], kind="stable")
    out: list[str | None] = [None] * len(prompts)
    for n, start in enumerate(tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False)):
        idx = order[start:start + batch_size]
        batch = encode_chats(tokenizer, [prompts[i] for i in idx])
        sampler = [] if temperature == 0 else [TopKSampler(temperature, sampling_top_k(model),
                                                          seeded_generator(seed * 100_003 + n, device))]
        generated = model.generate(input_ids=batch.input_ids.to(device),
                                   attention_mask=batch.attention_mask.to(device), do_sample=False,
                                   logits_processor=LogitsProcessorList(sampler),
                                   max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
        new_tokens = generated[:, batch.input_ids.shape[1]:]
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
    return out


HF_DEFAULT_TOP_K = 50  # what generate(do_sample=True) keeps when neither the call nor the model sets top_k
SAMPLER = "topk-1"  # in the keys of cached sampled answers: another sampler draws other answers


def sampling_top_k(model: PreTrainedModel) -> int:
    """The top-k that ``generate(do_sample=True)`` would apply for this model (0 = the whole vocabulary)."""
    top_k = getattr(model.generation_config, "top_k", None)
    return HF_DEFAULT_TOP_K if top_k is None else int(top_k)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class TopKSampler(LogitsProcessor):
    """Draws the next token itself and leaves greedy decoding nothing else to pick.

    The distribution is ``generate(do_sample=True)``'s: scores / temperature, kept to the ``top_k`` best
    (``sampling_top_k``: the model's ``generation_config``, else transformers' 50; None or 0 keeps the whole
    vocabulary). Drawing among those k instead of ``torch.multinomial`` over the whole vocabulary removes a fifth
    of CPU decoding time (bench/sample_answers.py), and its own generator keeps a batch's draws independent of
    any other RNG use.
    Two edge cases differ from transformers: a tie with the k-th score keeps exactly k tokens (transformers keeps
    every tied one), and a model's ``generation_config`` ``min_p``, ``typical_p``, ``epsilon_cutoff`` or
    ``eta_cutoff`` is not applied (none of the configured models sets them)."""

    def __init__(self, temperature: float, top_k: int | None, generator: torch.Generator):
        if temperature <= 0:
            raise TraitmonError(f"sampling temperature must be above 0, got {temperature}")
        self.temperature, self.top_k, self.generator = temperature, top_k, generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = min(self.top_k or scores.shape[-1], scores.shape[-1])
        best, tokens = torch.topk(scores.float() / self.temperature, k, dim=-1)
        drawn = tokens.gather(-1, torch.multinomial(torch.softmax(best, dim=-1), 1, generator=self.generator))
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


def row_seed(seed: int, row: int) -> int:
    """The seed of one request: fixed by the run's seed and the row, whatever the order replies arrive in."""
    return seed * 100_003 + row


def _post_json(url: str, payload: dict, api_key: str, timeout: float, retries: int) -> dict:
    """POST JSON, retrying 429 / 5xx / connection errors with back-off; a clear one-line error otherwise."""
    import json
    import time
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 429 and exc.code < 500 or attempt == retries:
                raise TraitmonError(f"generation endpoint {url} answered HTTP {exc.code}: {exc.read()[:300]!r}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if attempt == min(retries, 2):
                raise TraitmonError(f"generation endpoint {url} is unreachable: {getattr(exc, 'reason', exc)}") from None
        except ValueError:
            raise TraitmonError(f"generation endpoint {url} did not answer JSON") from None
        time.sleep(2 ** attempt * 0.5)
    raise AssertionError("unreachable")


class ServerGenerator:
    """Answers through an OpenAI-compatible chat-completions endpoint serving LoRA adapters by name (vLLM with
    ``--enable-lora`` and runtime loading, or ``traitmon serve-generate``). The value of the environment
    variable named by ``api_key_env`` is sent as a bearer token to ``base_url`` only; no key on command lines."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 300.0, max_retries: int = 3):
        import os

        from traitmon.judges import check_base_url

        self.base_url, self.model = check_base_url(base_url), model
        self.api_key = os.environ.get(api_key_env, "")
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries

    def post(self, route: str, payload: dict) -> dict:
        return _post_json(f"{self.base_url}/{route}", payload, self.api_key, self.timeout, self.max_retries)

    def load_adapter(self, name: str, path: str) -> None:
        self.post("load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    def unload_adapter(self, name: str) -> None:
        self.post("unload_lora_adapter", {"lora_name": name})

    def responses(self, prompts: list[Messages], max_new_tokens: int, temperature: float, seed: int,
                  model: str | None = None) -> list[str]:
        """One answer per prompt, requested concurrently; row i is seeded with ``row_seed(seed, i)``."""
        import concurrent.futures

        def one(i: int) -> str:
            reply = self.post("chat/completions", {"model": model or self.model, "messages": prompts[i],
                                                   "max_tokens": max_new_tokens, "temperature": temperature,
                                                   "top_p": 1.0, "seed": row_seed(seed, i)})
            try:
                return str(reply["choices"][0]["message"]["content"]).strip()
            except (KeyError, IndexError, TypeError):
                raise TraitmonError(f"generation endpoint {self.base_url} returned no answer: {str(reply)[:300]}") from None

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, range(len(prompts))))
