"""LoRA finetuning through ``transformers.Trainer``: checkpoints at fixed steps, loss on the final assistant
turn only, exact resume after a kill.

Checkpoint steps are fixed by the config (``checkpoint_steps``), so the workflow's DAG is static. At every
checkpoint ``FinetuneRecorder`` makes the Trainer save its full state (adapter, optimizer, scheduler, RNG) under
``OUT/.work/state-{step}``, outside the workflow's outputs; the state becomes visible (renamed from the
Trainer's ``checkpoint-{step}``) only once complete. A run killed midway resumes through the Trainer's own
``resume_from_checkpoint`` from the last complete state of the same settings and data and reaches the same
adapter as an uninterrupted run. The Trainer loads those states with ``torch.load(weights_only=True)``; the
states are checked to load that way before resuming. Adapters are saved in the standard peft format, so
``PeftModel.from_pretrained`` loads them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from traitmon.chat import IGNORE_INDEX, AssistantOnlyCollator, encode_training_example, learned_positions
from traitmon.config import checkpoint_steps  # lives in config: the workflow imports it without torch
from traitmon.errors import TraitmonError
from traitmon.guard import GUARD_RECORD, Guard, GuardOutcome, clear_records, prepare_store, settle
from traitmon.io import atomic_path, stable_hash, write_csv, write_json
from traitmon.models import load_model, model_info
from traitmon.settings import FinetuneSettings, finetune_dict

log = logging.getLogger(__name__)
STATE_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what a published checkpoint holds


def encode_rows(tokenizer: PreTrainedTokenizerBase, rows: list[dict], settings: FinetuneSettings,
                name: str) -> list[dict[str, list[int]]]:
    """Encode chats; drop rows whose answer is cut away entirely by ``max_length`` (nothing to learn)."""
    encoded = [encode_training_example(tokenizer, r["messages"], settings.max_length) for r in rows]
    kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e["labels"])]
    if len(kept) < len(encoded):
        log.warning("%s: %d of %d rows have no answer tokens within max_length=%d and are dropped", name,
                    len(encoded) - len(kept), len(encoded), settings.max_length)
    if not kept:
        raise TraitmonError(f"{name}: none of {len(encoded)} rows has answer tokens within "
                            f"max_length={settings.max_length}")
    return kept


def uses_bf16(settings: FinetuneSettings, device: torch.device) -> bool:
    """Whether training on ``device`` runs under bf16 autocast: ``precision`` bf16, or auto where ``device``
    computes bf16 natively (``traitmon.precision.resolve``); fp32 runs without autocast."""
    from traitmon.precision import resolve

    return resolve(settings.precision, device, "finetune") == "bf16"


def autocast(settings: FinetuneSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context the Trainer uses for ``settings`` (for evaluation and benchmarks)."""
    from traitmon.models import compute_precision

    return compute_precision("bf16" if uses_bf16(settings, device) else "fp32", device, "finetune")


@torch.no_grad()
def mean_token_nll(model: PreTrainedModel, examples: list[dict], collator: AssistantOnlyCollator,
                   batch_size: int, settings: FinetuneSettings) -> float:
    """Mean negative log-likelihood per learned token (eval mode, no grad; the training mode is restored).

    Rows run in length-sorted batches (less padding), and the LM head projects only the positions that predict
    a learned token of some row (``logits_to_keep``): the prompts' logits over the vocabulary were most of an
    evaluation's cost. The sum over tokens is the same, up to float rounding."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collator(examples[start:start + batch_size]).items()}
        learned = learned_positions(batch["labels"])
        keep = learned["logits_to_keep"]
        if not len(keep):
            continue
        with autocast(settings, device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=keep).logits
        kept_labels = learned["shift_labels"]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 kept_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
        total += float(loss)
        tokens += int((kept_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(tokens, 1)


def lora_config(settings: FinetuneSettings):
    """peft ``LoraConfig`` of the config's finetune section."""
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), use_rslora=settings.rslora,
                      task_type="CAUSAL_LM", bias="none")



def training_arguments(settings: FinetuneSettings, output_dir: str | Path, device: torch.device):
    """``TrainingArguments`` for the config's finetune section on ``device``; saves are made by
    ``FinetuneRecorder``."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), max_steps=settings.max_steps, per_device_train_batch_size=settings.micro_batch,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.lr,
        weight_decay=settings.weight_decay, lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup_steps, max_grad_norm=settings.max_grad_norm, optim="adamw_torch",
        seed=settings.seed, data_seed=settings.seed, bf16=uses_bf16(settings, device), use_cpu=device.type == "cpu",
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], label_names=["labels"],
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False, dataloader_num_workers=0)


@dataclass
class FinetuneRecorder(TrainerCallback):
    """Per-step training log, evaluation and saves at the configured steps, complete states for resuming.

    ``evaluate(step)`` returns the eval-log row; ``step_callback(step, row)`` runs once a step is fully done
    (logged, and saved when it is a checkpoint)."""

    checkpoints: list[int]
    work: Path
    run_hash: str
    evaluate: Callable[[int], dict]
    precision: str = "fp32"  # the resolved finetune.precision: a resume must train as the run began
    train_log: list[dict] = field(default_factory=list)
    eval_log: list[dict] = field(default_factory=list)
    step_callback: Callable[[int, dict], None] | None = None
    _started: tuple[float, int] = field(default=(0.0, 0), init=False, repr=False)  # clock, tokens seen
    _step_stats: dict = field(default_factory=dict, init=False, repr=False)

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        t0, tokens0 = self._started
        self._step_stats = {"tokens": state.num_input_tokens_seen - tokens0, "seconds": time.perf_counter() - t0}
        if state.global_step in self.checkpoints:
            self.eval_log.append(self.evaluate(state.global_step))
            control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # the end-of-training summary, not a step
            return
        row = {"step": state.global_step, "loss": logs["loss"], "lr": logs["learning_rate"],
               "grad_norm": logs.get("grad_norm", math.nan), **self._step_stats}
        self.train_log.append(row)
        if state.global_step not in self.checkpoints and self.step_callback is not None:
            self.step_callback(state.global_step, row)

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        saved = self.work / f"checkpoint-{step}"
        (saved / "training_args.bin").unlink(missing_ok=True)  # serialised Python objects: written, never read
        (saved / "state.json").write_text(json.dumps({"step": step, "run_hash": self.run_hash,
                                                      "precision": self.precision, "train_log": self.train_log, "eval_log": self.eval_log}))
        final = self.work / f"state-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(saved, final)  # a state is visible only once complete
        if self.step_callback is not None:
            self.step_callback(step, self.train_log[-1])


def latest_state(work: Path, run_hash: str) -> Path | None:
    """The newest complete state of this exact run; states of other settings or data, and saves cut short by
    a kill, are removed."""
    for unfinished in work.glob("checkpoint-*"):
        shutil.rmtree(unfinished, ignore_errors=True)
    best, best_step = None, -1
    for state in work.glob("state-*"):
        meta = state / "state.json"
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        if info.get("run_hash") != run_hash:
            shutil.rmtree(state, ignore_errors=True)
        elif info["step"] > best_step:
            best, best_step = state, info["step"]
    return best


def check_resume_precision(state: Path, info: dict, precision: str) -> None:
    """A run resumes only at the precision it began with (states saved before it was recorded: fp32 or bf16
    alike); a machine that resolves ``finetune.precision: auto`` otherwise must be told which to use."""
    began = info.get("precision", precision)
    if began != precision:
        raise TraitmonError(f"{state}: this run began at {began} and would resume at {precision} here "
                            f"(finetune.precision auto resolves by machine); set finetune.precision: {began} "
                            "to resume it, or delete the folder to start over")


def check_state_loads_safely(state: Path) -> None:
    """Every torch file of a resume state must load as plain data (``weights_only``), as the Trainer loads it;
    anything else (code in a crafted or foreign file) is refused before training starts, never executed."""
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        for path in sorted([*state.glob("*.pt"), *state.glob("*.pth"), *state.glob("*.bin")]):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - the weights-only loader's refusals share no narrower type
                raise TraitmonError(f"{path}: resume state is not plain tensor data ({type(exc).__name__}); "
                                    f"delete {state} to restart this finetune from step 0") from None


def check_split(name: str, train_rows: list[dict], heldout_rows: list[dict]) -> None:
    """Training needs rows to learn from and rows to hold out; say so at once, with the counts."""
    if not train_rows or not heldout_rows:
        raise TraitmonError(f"perturbation '{name}': {len(train_rows)} training and {len(heldout_rows)} held-out "
                            "rows; 'heldout' must be at least 1 and smaller than the dataset")


def run_identity(model_dir: str | Path, train_rows: list[dict], heldout_rows: list[dict],
                 general_chats: list[dict], settings: FinetuneSettings, dtype: str) -> str:
    """Hash of everything a resume state depends on: another value means its states are discarded."""
    import peft
    import transformers

    return stable_hash({"settings": finetune_dict(settings), "train": train_rows, "heldout": heldout_rows,
                        "general": general_chats,
                        "model": model_info(model_dir), "dtype": dtype,
                        "versions": [transformers.__version__, peft.__version__, torch.__version__]})


def _general_rows(general_chats: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": c["user"]}, {"role": "assistant", "content": c["assistant"]}]}
            for c in general_chats]


def _peft_model(model_dir: str | Path, settings: FinetuneSettings, dtype: str):
    from peft import get_peft_model

    model, tok = load_model(model_dir, dtype)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    torch.manual_seed(settings.seed)  # LoRA's A matrices are drawn here
    return get_peft_model(model, lora_config(settings)), tok


def _publish(out_dir: Path, work: Path, steps: list[int], recorder: FinetuneRecorder,
             guarded: GuardOutcome | None = None) -> None:
    """Each checkpoint's adapter from its state (or, where the guard filled it, from the kept adapter, with the
    guard's note), then the logs."""
    sources = {step: work / f"state-{step}" for step in steps} | (guarded.sources if guarded else {})
    notes = guarded.notes if guarded else {}
    for step in steps:
        with atomic_path(out_dir / f"checkpoint-{step}") as tmp:
            tmp.mkdir()
            for name in STATE_FILES:
                shutil.copy2(sources[step] / name, tmp / name)
            if step in notes:
                write_json(tmp / GUARD_RECORD, notes[step])
    write_csv(out_dir / "train_log.csv", pd.DataFrame(recorder.train_log))
    write_csv(out_dir / "eval_log.csv", pd.DataFrame(recorder.eval_log))


@dataclass
class _Run:
    """A finetune ready to train: the peft model, its tokenizer and the encoded data."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    collator: AssistantOnlyCollator
    train: list[dict]
    heldout: list[dict]
    general: list[dict]

    def evaluate(self, step: int, settings: FinetuneSettings) -> dict:
        """The eval-log row of the adapter now in the model: held-out loss and general-text perplexity."""
        args = (self.collator, settings.micro_batch * 2, settings)
        return {"step": step, "heldout_loss": mean_token_nll(self.model, self.heldout, *args),
                "general_ppl": math.exp(mean_token_nll(self.model, self.general, *args))}


def _prepare(model_dir: str | Path, train_rows: list[dict], heldout_rows: list[dict], general_chats: list[dict],
             settings: FinetuneSettings, name: str, model_dtype: str) -> _Run:
    model, tok = _peft_model(model_dir, settings, model_dtype)
    # Trainer wraps the model in DataParallel when it sees several GPUs, which would split logits_to_keep
    learned_only = torch.cuda.device_count() <= 1
    return _Run(model, tok, AssistantOnlyCollator(tok.pad_token_id, learned_logits_only=learned_only),
                encode_rows(tok, train_rows, settings, f"{name}: train"),
                encode_rows(tok, heldout_rows, settings, f"{name}: heldout"),
                encode_rows(tok, _general_rows(general_chats), settings, "general chats"))


def finetune(model_dir: str | Path, train_rows: list[dict], heldout_rows: list[dict], general_chats: list[dict],
             settings: FinetuneSettings, out_dir: str | Path, model_dtype: str = "auto",
             step_callback: Callable[[int, dict], None] | None = None,
             callbacks: list[TrainerCallback] | None = None, guard: Guard | None = None) -> dict:
    """Train a LoRA adapter; write ``checkpoint-{step}/``, ``train_log.csv``, ``eval_log.csv``, ``run.json``.

    ``eval_log`` has, for step 0 and each checkpoint, the loss on held-out rows of the perturbation and the
    perplexity on general chats (the baselines the paper finds blind to EM). ``step_callback(step, row)``
    runs after each optimizer step (used by tests to interrupt a run); ``callbacks`` are further
    ``TrainerCallback``s (a live ``TraitMonitorCallback``, for instance). ``guard`` (``traitmon.guard``) watches
    the run and may end it early; the checkpoints it no longer reaches are then filled (see ``traitmon.guard``)
    and ``guard.json`` is written beside ``run.json``. The perturbation is named after ``out_dir`` in errors.
    """
    from transformers import Trainer

    out_dir, work = Path(out_dir), Path(out_dir) / ".work"
    check_split(out_dir.name, train_rows, heldout_rows)
    work.mkdir(parents=True, exist_ok=True)
    run_hash = run_identity(model_dir, train_rows, heldout_rows, general_chats, settings, model_dtype)
    run = _prepare(model_dir, train_rows, heldout_rows, general_chats, settings, out_dir.name, model_dtype)
    checkpoints = checkpoint_steps(settings)

    def evaluate(step: int) -> dict:
        return run.evaluate(step, settings)

    device = next(run.model.parameters()).device
    precision = "bf16" if uses_bf16(settings, device) else "fp32"
    recorder = FinetuneRecorder(checkpoints, work, run_hash, evaluate, precision, step_callback=step_callback)
    state, resumed_from = latest_state(work, run_hash), 0
    if state is None:
        recorder.eval_log.append(evaluate(0))
    else:
        check_state_loads_safely(state)
        info = json.loads((state / "state.json").read_text())
        check_resume_precision(state, info, precision)
        recorder.train_log, recorder.eval_log, resumed_from = info["train_log"], info["eval_log"], info["step"]
        log.info("resuming %s from step %d", out_dir, resumed_from)
    trainer = Trainer(model=run.model, args=training_arguments(settings, work, device),
                      train_dataset=run.train, data_collator=run.collator, callbacks=[recorder, *(callbacks or [])])
    if guard is None:
        clear_records(out_dir)
    else:
        prepare_store(guard, out_dir, resumed_from)
        guard.callback.attach(trainer)  # after the recorder: a checkpoint is evaluated before the guard acts
    trainer.train(resume_from_checkpoint=str(state) if state is not None else None)
    guarded = (settle(guard, run.model, checkpoints, work, recorder.eval_log, evaluate, resumed_from)
               if guard is not None else None)
    _publish(out_dir, work, checkpoints, recorder, guarded)
    summary = {"run_hash": run_hash, "checkpoints": checkpoints, "max_steps": settings.max_steps,
               "trainable_parameters": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
               "resumed_from": resumed_from,
               "final_loss": recorder.train_log[-1]["loss"] if recorder.train_log else None, "device": str(device),
               "precision": precision}
    if guarded is not None:
        _finish_guarded(out_dir, work, guarded, summary)
    write_json(out_dir / "run.json", summary)
    if not settings.keep_states:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _finish_guarded(out_dir: Path, work: Path, guarded: GuardOutcome, summary: dict) -> None:
    write_json(out_dir / GUARD_RECORD, guarded.record)
    summary["guard"] = guarded.summary
    for step in guarded.sources:  # states saved after the guard acted are not training states: never resume one
        shutil.rmtree(work / f"state-{step}", ignore_errors=True)
