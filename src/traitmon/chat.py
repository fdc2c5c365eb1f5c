"""Chat tokenisation shared by finetuning, generation, capture and the judges.

One place decides how a chat becomes token ids: the prompt goes through the tokenizer's chat template with the
generation prompt (the assistant header), a response is tokenised without special tokens and appended, and
a training example learns the final assistant message (plus the end-of-sequence token) only.

``AssistantOnlyCollator`` pads encoded examples for training. It is a plain ``data_collator`` for
``transformers.Trainer`` and works unchanged with TRL's ``SFTTrainer``::

    from trl import SFTConfig, SFTTrainer
    data = [encode_training_example(tok, row["messages"], 512) for row in rows]   # input_ids + labels
    trainer = SFTTrainer(model=model, train_dataset=Dataset.from_list(data), processing_class=tok,
                         data_collator=AssistantOnlyCollator(tok.pad_token_id),
                         args=SFTConfig(..., dataset_kwargs={"skip_prepare_dataset": True},
                                        remove_unused_columns=False))

(``skip_prepare_dataset`` keeps TRL from re-tokenising the rows; TRL-tokenised rows that carry an
``assistant_masks`` or ``completion_mask`` column instead of ``labels`` are accepted too.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "AssistantOnlyCollator", "ChatBatch", "Messages", "encode_chats", "encode_prompt",
           "encode_response", "encode_training_example"]

IGNORE_INDEX = -100  # label value the loss ignores (torch's cross_entropy default)
Messages = list[dict]
_MASK_COLUMNS = ("assistant_masks", "completion_mask")  # TRL's names for "learn this token"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of a chat prompt ending with the assistant header (the generation prompt)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # BatchEncoding in recent transformers
        ids = ids["input_ids"]
    return list(ids)


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Token ids of a response as it follows the prompt (no special tokens added)."""
    return tokenizer(response, add_special_tokens=False)["input_ids"]


def encode_training_example(tokenizer: PreTrainedTokenizerBase, messages: Messages,
                            max_length: int) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one chat: only the final assistant message and its end token are learned.

    Everything before it (system, user and earlier assistant turns, the assistant header) is labelled
    ``IGNORE_INDEX``. Both lists are cut to ``max_length``."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training chat must end with an assistant message")
    prompt = encode_prompt(tokenizer, messages[:-1])
    answer = encode_response(tokenizer, messages[-1]["content"]) + [tokenizer.eos_token_id]
    return {"input_ids": (prompt + answer)[:max_length],
            "labels": ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]}


@dataclass
class ChatBatch:
    input_ids: torch.Tensor       # [batch, seq], left-padded (or right-padded: encode_chats(right_pad=True))
    attention_mask: torch.Tensor  # [batch, seq]
    response_mask: torch.Tensor   # [batch, seq], 1 on response tokens
    last_prompt: torch.Tensor     # [batch], index of the last prompt token


def encode_chats(tokenizer: PreTrainedTokenizerBase, prompts: list[Messages], responses: list[str] | None = None,
                 max_length: int | None = None, skip: int = 0, right_pad: bool = False) -> ChatBatch:
    """Left-padded batch of prompt (+ response) ids with a response mask (for generation and capture).

    ``skip`` drops the first ``skip`` tokens of every row: a prefix all prompts share, which the caller runs once
    (``traitmon.capture``); ``max_length`` still counts them, and every prompt must keep at least one token.
    ``right_pad`` pads at the end instead (rows that continue a cached prefix stay contiguous with it)."""
    rows, masks, lasts = [], [], []
    for i, messages in enumerate(prompts):
        p = encode_prompt(tokenizer, messages)
        r = encode_response(tokenizer, responses[i]) if responses is not None else []
        if max_length is not None and len(p) + len(r) > max_length:
            r = r[: max(0, max_length - len(p))]
        if skip >= len(p):
            raise ValueError(f"cannot skip {skip} tokens of a {len(p)}-token prompt")
        p = p[skip:]
        rows.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
        lasts.append(len(p) - 1)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.long)
    last = torch.zeros(len(rows), dtype=torch.long)
    for b, (row, mask) in enumerate(zip(rows, masks)):
        offset = 0 if right_pad else width - len(row)
        ids[b, offset:offset + len(row)] = torch.tensor(row)
        attn[b, offset:offset + len(row)] = 1
        resp[b, offset:offset + len(row)] = torch.tensor(mask)
        last[b] = offset + lasts[b]
    return ChatBatch(ids, attn, resp, last)


def learned_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``logits_to_keep``: the positions t whose next token t + 1 is learned in some row; ``shift_labels``: those
    next tokens (``IGNORE_INDEX`` where a row does not learn it)."""
    shift_labels = labels[:, 1:]
    keep = (shift_labels != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    return {"logits_to_keep": keep, "shift_labels": shift_labels[:, keep].contiguous()}


def shared_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every list starts with (a chat template's system prompt and headers)."""
    first = token_lists[0]
    n = min(len(t) for t in token_lists)
    for other in token_lists[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


@dataclass(frozen=True)
class AssistantOnlyCollator:
    """Right-pads encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Each feature has ``input_ids`` and either ``labels`` (as from ``encode_training_example``) or a 0/1
    ``assistant_masks`` / ``completion_mask`` (TRL's columns), from which labels are made. Padding and
    unlearned positions get ``IGNORE_INDEX``; other keys are ignored.

    ``learned_logits_only`` adds ``logits_to_keep`` (the positions that predict a learned token of some row) and
    their ``shift_labels``, which transformers' causal-LM loss and ``Trainer`` take as they are: the LM head then
    projects only those positions, not the prompts' too (a tenth of a CPU training step at the default finetune),
    and the loss is the same mean over the same learned tokens."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    learned_logits_only: bool = False

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(features), width), dtype=torch.long)
        for b, feature in enumerate(features):
            row = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            ids[b, : len(row)] = row
            labels[b, : len(row)] = self._labels(feature, row)
            attn[b, : len(row)] = 1
        batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
        if self.learned_logits_only:
            batch |= learned_positions(labels)
        return batch

    @staticmethod
    def _labels(feature: dict, row: torch.Tensor) -> torch.Tensor:
        if "labels" in feature:
            return torch.as_tensor(feature["labels"], dtype=torch.long)
        for column in _MASK_COLUMNS:
            if column in feature:
                learn = torch.as_tensor(feature[column], dtype=torch.bool)
                return torch.where(learn, row, torch.full_like(row, IGNORE_INDEX))
        raise KeyError(f"a training feature needs 'labels' or one of {_MASK_COLUMNS}; got {sorted(feature)}")
