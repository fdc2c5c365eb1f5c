"""LoRA finetuning with checkpoints, loss on assistant tokens only, and exact resume.

Checkpoint steps are fixed by the config (``checkpoint_steps``), so the workflow's DAG is static. At every
checkpoint the full training state (adapter, optimizer, scheduler, RNG, logs) is written atomically under
``OUT/.work/state-{step}``; a run killed midway restarts from the last complete state and reaches the same
adapter as an uninterrupted run. Adapters are saved in the standard peft format, so
``PeftModel.from_pretrained`` loads them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from traitmon.capture import prompt_ids
from traitmon.io import atomic_path, stable_hash, write_csv, write_json
from traitmon.models import load_model, model_info

log = logging.getLogger(__name__)
IGNORE = -100


def checkpoint_steps(settings: dict) -> list[int]:
    """Steps (> 0) at which adapters are saved: an explicit list, or every k steps, always with the last."""
    if settings.get("checkpoint_steps"):
        steps = set(settings["checkpoint_steps"])
    else:
        steps = set(range(settings["checkpoint_every"], settings["max_steps"] + 1, settings["checkpoint_every"]))
    steps.add(settings["max_steps"])
    return sorted(s for s in steps if 0 < s <= settings["max_steps"])


def encode_for_training(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for one chat: only the final assistant message (and its end token) is learned."""
    prompt = prompt_ids(tokenizer, messages[:-1])
    answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return ids, labels


def encode_rows(tokenizer, rows: list[dict], settings: dict, name: str) -> list[tuple[list[int], list[int]]]:
    """Encode chats; drop rows whose answer is cut away entirely by ``max_length`` (nothing to learn)."""
    encoded = [encode_for_training(tokenizer, r["messages"], settings["max_length"]) for r in rows]
    kept = [e for e in encoded if any(label != IGNORE for label in e[1])]
    if len(kept) < len(encoded):
        log.warning("%s: %d of %d rows have no answer tokens within max_length=%d and are dropped", name,
                    len(encoded) - len(kept), len(encoded), settings["max_length"])
    if not kept:
        raise ValueError(f"{name}: no row has answer tokens within max_length={settings['max_length']}")
    return kept


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for b, (row_ids, row_labels) in enumerate(examples):
        ids[b, : len(row_ids)] = torch.tensor(row_ids)
        labels[b, : len(row_labels)] = torch.tensor(row_labels)
        attn[b, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def example_order(n_examples: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of examples ``start .. start+count`` in an endless sequence of seeded epoch permutations.

    A pure function of the position, so a resumed run sees exactly the batches the original would have."""
    out = []
    for pos in range(start, start + count):
        epoch, offset = divmod(pos, n_examples)
        out.append(int(_epoch_permutation(n_examples, seed, epoch)[offset]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def _autocast(settings: dict, device: torch.device):
    if settings.get("precision", "auto") in ("auto", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def mean_token_nll(model, examples, pad_id: int, batch_size: int, settings: dict) -> float:
    """Mean negative log-likelihood per learned token (eval mode, no grad)."""
    device = next(model.parameters()).device
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with _autocast(settings, device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        tokens += int((shift_labels != IGNORE).sum())
    return total / max(tokens, 1)


def _lora_config(settings: dict):
    from peft import LoraConfig

    return LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                      target_modules=settings["target_modules"], use_rslora=settings["rslora"],
                      task_type="CAUSAL_LM", bias="none")


def _save_state(work: Path, step: int, model, optimizer, scheduler, run_hash: str, train_log, eval_log) -> None:
    with atomic_path(work / f"state-{step}") as tmp:
        model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "run_hash": run_hash, "train_log": train_log,
                                                    "eval_log": eval_log}))


def _latest_state(work: Path, run_hash: str) -> Path | None:
    """The newest complete state of this exact run; states of other settings or data are removed."""
    best, best_step = None, -1
    for state in work.glob("state-*"):
        meta = state / "state.json"
        if not meta.is_file():
            continue
        info = json.loads(meta.read_text())
        if info["run_hash"] != run_hash:
            shutil.rmtree(state, ignore_errors=True)
            continue
        if info["step"] > best_step:
            best, best_step = state, info["step"]
    return best


def finetune(model_dir: str | Path, train_rows: list[dict], heldout_rows: list[dict], general_chats: list[dict],
             settings: dict, out_dir: str | Path, dtype: str = "auto",
             step_callback: Callable[[int, dict], None] | None = None) -> dict:
    """Train a LoRA adapter; write ``checkpoint-{step}/``, ``train_log.csv``, ``eval_log.csv``, ``run.json``.

    ``eval_log`` has, for step 0 and each checkpoint, the loss on held-out rows of the perturbation and the
    perplexity on general chats (the baselines the paper finds blind to EM). ``step_callback(step, row)``
    runs after each optimizer step (used by tests to interrupt a run, and by live monitors).
    """
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import get_scheduler

    out_dir, work = Path(out_dir), Path(out_dir) / ".work"
    work.mkdir(parents=True, exist_ok=True)
    run_hash = stable_hash({"settings": settings, "train": train_rows, "model": model_info(model_dir),
                            "dtype": dtype})
    model, tok = load_model(model_dir, dtype)
    device = next(model.parameters()).device
    if settings.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    torch.manual_seed(settings["seed"])
    model = get_peft_model(model, _lora_config(settings))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    max_steps = settings["max_steps"]
    scheduler = get_scheduler(settings["scheduler"], optimizer, num_warmup_steps=settings["warmup_steps"],
                              num_training_steps=max_steps)
    train, heldout = encode_rows(tok, train_rows, settings, "train"), encode_rows(tok, heldout_rows, settings, "heldout")
    general = encode_rows(tok, [{"messages": [{"role": "user", "content": c["user"]},
                                    {"role": "assistant", "content": c["assistant"]}]} for c in general_chats],
                           settings, "general")
    pad_id, micro, accum = tok.pad_token_id, settings["micro_batch"], settings["grad_accum"]
    checkpoints = checkpoint_steps(settings)

    def evaluate(step: int) -> dict:
        heldout_nll = mean_token_nll(model, heldout, pad_id, micro * 2, settings)
        general_nll = mean_token_nll(model, general, pad_id, micro * 2, settings)
        return {"step": step, "heldout_loss": heldout_nll, "general_ppl": math.exp(general_nll)}

    train_log, eval_log, start = [], [], 0
    state = _latest_state(work, run_hash)
    if state is not None:
        info = json.loads((state / "state.json").read_text())
        set_peft_model_state_dict(model, load_file(state / "adapter_model.safetensors"))
        blob = torch.load(state / "training_state.pt", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        if blob["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        start, train_log, eval_log = info["step"], info["train_log"], info["eval_log"]
        log.info("resuming %s from step %d", out_dir, start)
    else:
        eval_log.append(evaluate(0))

    progress = tqdm(range(start + 1, max_steps + 1), desc=f"finetune {out_dir.name}", unit="step",
                    initial=start, total=max_steps)
    for step in progress:
        model.train()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        order = example_order(len(train), settings["seed"], (step - 1) * micro * accum, micro * accum)
        loss_sum, tokens = 0.0, 0
        for m in range(accum):
            batch = {k: v.to(device) for k, v in collate([train[i] for i in order[m * micro:(m + 1) * micro]],
                                                         pad_id).items()}
            with _autocast(settings, device):
                loss = model(**batch).loss / accum
            loss.backward()
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings["max_grad_norm"]))
        row = {"step": step, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens": tokens, "seconds": time.perf_counter() - t0}
        optimizer.step()
        scheduler.step()
        train_log.append(row)
        progress.set_postfix(loss=f"{loss_sum:.3f}")
        if step in checkpoints:
            eval_log.append(evaluate(step))
            _save_state(work, step, model, optimizer, scheduler, run_hash, train_log, eval_log)
        if step_callback is not None:
            step_callback(step, row)

    for step in checkpoints:
        with atomic_path(out_dir / f"checkpoint-{step}") as tmp:
            tmp.mkdir()
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(work / f"state-{step}" / name, tmp / name)
    write_csv(out_dir / "train_log.csv", pd.DataFrame(train_log))
    write_csv(out_dir / "eval_log.csv", pd.DataFrame(eval_log))
    summary = {"run_hash": run_hash, "checkpoints": checkpoints, "max_steps": max_steps,
               "trainable_parameters": sum(p.numel() for p in params), "resumed_from": start,
               "final_loss": train_log[-1]["loss"] if train_log else None, "device": str(device)}
    write_json(out_dir / "run.json", summary)
    if not settings.get("keep_states", False):
        shutil.rmtree(work, ignore_errors=True)
    return summary
