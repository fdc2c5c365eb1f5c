"""Watching a finetune while it runs: a ``transformers`` Trainer callback that scores the model being trained
with a monitor bundle (``traitmon.bundle``) and, on a sustained alarm, warns, stops or rolls back.

``on_alarm``: ``warn`` (default) only warns; ``stop`` ends training after ``patience`` consecutive alarming
checks; ``rollback`` also restores the adapter weights of the last non-alarming check (kept in memory, adapter
weights only; the adapter as initialised when no check was safe yet) and saves them as ``checkpoint-safe`` in
the trainer's output folder with ``rollback.json`` saying why (steps, scores, threshold).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import TrainerCallback

from traitmon.bundle import MonitorBundle
from traitmon.errors import TraitmonError

ON_ALARM = ("warn", "stop", "rollback")
SAFE_CHECKPOINT, ROLLBACK_RECORD = "checkpoint-safe", "rollback.json"

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TraitMonitorCallback(TrainerCallback):
    """A ``transformers`` callback (Trainer, TRL's SFTTrainer) that scores the model being trained every
    ``every`` steps (and at each save): drift per trait, monitor score, alarm. Values go through the trainer's
    logging (``trainer.log`` when attached with ``attach``, else ``state.log_history``), a Zarr store if given,
    and ``self.history``; on alarm it acts as ``on_alarm`` says (module docstring). ``stop_on_alarm=True`` is
    the deprecated spelling of ``on_alarm="stop"``."""

    def __init__(self, bundle: MonitorBundle, tokenizer: PreTrainedTokenizerBase, every: int = 50, on_save: bool = True,
                 stop_on_alarm: bool = False, store: str | Path | None = None, on_alarm: str = "warn",
                 patience: int = 1):
        if stop_on_alarm:
            warnings.warn("stop_on_alarm is deprecated: use on_alarm='stop'", DeprecationWarning, stacklevel=2)
            on_alarm = "stop" if on_alarm == "warn" else on_alarm
        if on_alarm not in ON_ALARM:
            raise TraitmonError(f"on_alarm must be one of {list(ON_ALARM)}, not {on_alarm!r}")
        if int(patience) < 1:
            raise TraitmonError(f"patience must be at least 1, not {patience!r}")
        if on_alarm != "warn" and bundle.monitor is None:
            raise TraitmonError(f"on_alarm={on_alarm!r} needs a bundle with a fitted monitor (it has none)")
        self.bundle, self.tokenizer, self.every, self.on_save_flag = bundle, tokenizer, every, on_save
        self.on_alarm, self.patience = on_alarm, int(patience)
        self.stop_on_alarm = on_alarm in ("stop", "rollback")
        self.store = Path(store) if store else None
        self.history: list[dict] = []
        self.trainer = None
        self.seconds = 0.0                # all checks together
        self.seconds_per_check: list[float] = []
        self.streak: list[dict] = []      # the current run of consecutive alarming checks
        self.safe: dict | None = None     # {"step", "result", "weights"}: last non-alarming check (rollback)
        self.rollback_path: Path | None = None
        self._last_step = -1

    def attach(self, trainer) -> TraitMonitorCallback:
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _check(self, args, state, control, model) -> None:
        if model is None or state.global_step == self._last_step:
            return
        if self._last_step < 0:
            self._warn_on_dtype(model)
        self._last_step = state.global_step
        t0 = time.perf_counter()
        result = {"step": int(state.global_step), **self.bundle.score(model, self.tokenizer)}
        self.seconds_per_check.append(time.perf_counter() - t0)
        self.seconds += self.seconds_per_check[-1]
        self.history.append(result)
        logs = {f"traitmon/{k}": float(v) for k, v in result.items() if k != "step"}
        if self.trainer is not None:
            should_log = control.should_log
            self.trainer.log(logs)  # clears control.should_log (Trainer's on_log): this step's own loss would go
            control.should_log = should_log  # unlogged, and the next logged loss would average two steps
        else:
            state.log_history.append({**logs, "step": state.global_step})
        if self.store is not None:
            self._append(result)
        self._act(result, args, control, model)

    def _act(self, result: dict, args, control, model) -> None:
        if not result.get("alarm"):
            self.streak = []
            if self.on_alarm == "rollback":
                self.safe = {"step": result["step"], "result": result, "weights": adapter_weights(model)}
            return
        self.streak.append(result)
        warnings.warn(f"traitmon: EM alarm at step {result['step']} (monitor score {result['monitor_score']:.3f} "
                      f">= {self.bundle.monitor.threshold:.3f}; {len(self.streak)}/{self.patience} in a row)",
                      stacklevel=3)
        if self.on_alarm == "warn" or len(self.streak) < self.patience:
            return
        control.should_training_stop = True
        if self.on_alarm == "rollback" and args is not None:
            self.rollback_path = self._rollback(model, Path(args.output_dir))

    def _rollback(self, model, output_dir: Path) -> Path:
        """Restore the last safe adapter weights into ``model`` and save them as ``checkpoint-safe``."""
        from traitmon.io import atomic_path, write_json

        restore_adapter_weights(model, self.safe["weights"])
        target = output_dir / SAFE_CHECKPOINT
        with atomic_path(target) as tmp:
            model.save_pretrained(str(tmp))
            write_json(tmp / ROLLBACK_RECORD, self.record())
        return target

    def record(self) -> dict:
        """Why the run was rolled back: the safe step and its scores, the alarming steps and theirs."""
        safe = self.safe or {}
        return {"on_alarm": self.on_alarm, "patience": self.patience,
                "threshold": float(self.bundle.monitor.threshold),
                "safe_step": safe.get("step"), "safe_scores": check_scores(safe.get("result") or {}),
                "alarm_steps": [r["step"] for r in self.streak], "alarm_scores": [check_scores(r) for r in self.streak]}

    def _warn_on_dtype(self, model) -> None:
        """The base projections were measured in the bundle's dtype: a model in another dtype drifts by the
        rounding difference alone (in bf16 that can exceed an early finetune's real drift)."""
        from traitmon.hooks import find_decoder
        from traitmon.models import resolve_dtype

        param = next(find_decoder(model).parameters())
        expected = resolve_dtype(self.bundle.model_dtype, param.device)
        if param.dtype != expected:
            warnings.warn(f"traitmon: the model is in {param.dtype} but the bundle's base reference was measured "
                          f"in {expected} (model dtype '{self.bundle.model_dtype}'): load the base in that dtype "
                          "to compare drift with the workflow's", stacklevel=3)

    def _append(self, result: dict) -> None:
        import xarray as xr

        ds = xr.Dataset({"drift": (("step", "trait"), [[result[f"drift_{t}"] for t in self.bundle.traits]])},
                        coords={"step": [result["step"]], "trait": np.array(self.bundle.traits, dtype=object)})
        if "monitor_score" in result:
            ds["monitor_score"] = ("step", [result["monitor_score"]])
        ds = ds.astype({name: "float32" for name in ds.data_vars})
        if (self.store / "zarr.json").exists():
            ds.to_zarr(self.store, mode="a", append_dim="step", zarr_format=3, consolidated=False)
        else:
            ds.to_zarr(self.store, mode="w", zarr_format=3, consolidated=False)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # before any check, the safe state is the adapter as initialised (for LoRA: the base model itself)
        if self.on_alarm == "rollback" and model is not None and self.safe is None:
            self.safe = {"step": int(state.global_step), "result": None, "weights": adapter_weights(model)}
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._check(args, state, control, model)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.on_save_flag:
            self._check(args, state, control, model)
        return control


def check_scores(result: dict) -> dict:
    """The drift and monitor score of one check, as plain floats (for the JSON records)."""
    return {k: float(v) for k, v in result.items() if k.startswith("drift_") or k == "monitor_score"}


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's adapter weights only (peft's adapter state dict), bit for bit."""
    from peft import get_peft_model_state_dict

    try:
        state = get_peft_model_state_dict(model)
    except (AttributeError, ValueError) as exc:
        raise TraitmonError(f"on_alarm='rollback' needs a peft (LoRA) model ({type(exc).__name__}: {exc})") from None
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


@torch.no_grad()
def restore_adapter_weights(model, weights: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise TraitmonError(f"rollback: adapter weights did not fit the model (unexpected keys {unexpected[:3]})")
