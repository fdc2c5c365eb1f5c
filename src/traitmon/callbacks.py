"""Watching a finetune while it runs: a ``transformers`` Trainer callback that scores the model being trained
with a monitor bundle (``traitmon.bundle``)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from transformers import TrainerCallback

from traitmon.bundle import MonitorBundle

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TraitMonitorCallback(TrainerCallback):
    """A ``transformers`` callback (Trainer, TRL's SFTTrainer) that scores the model being trained every
    ``every`` steps (and at each save): drift per trait, monitor score, alarm. Values go through the trainer's
    logging (``trainer.log`` when attached with ``attach``, else ``state.log_history``), a Zarr store if given,
    and ``self.history``; on alarm it warns or, with ``stop_on_alarm``, stops training."""

    def __init__(self, bundle: MonitorBundle, tokenizer: PreTrainedTokenizerBase, every: int = 50,
                 on_save: bool = True,
                 stop_on_alarm: bool = False, store: str | Path | None = None):
        self.bundle, self.tokenizer, self.every, self.on_save_flag = bundle, tokenizer, every, on_save
        self.stop_on_alarm, self.store = stop_on_alarm, Path(store) if store else None
        self.history: list[dict] = []
        self.trainer = None
        self.seconds = 0.0
        self._last_step = -1

    def attach(self, trainer) -> TraitMonitorCallback:
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _check(self, state, control, model) -> None:
        if model is None or state.global_step == self._last_step:
            return
        if self._last_step < 0:
            self._warn_on_dtype(model)
        self._last_step = state.global_step
        t0 = time.perf_counter()
        result = {"step": int(state.global_step), **self.bundle.score(model, self.tokenizer)}
        self.seconds += time.perf_counter() - t0
        self.history.append(result)
        logs = {f"traitmon/{k}": float(v) for k, v in result.items() if k != "step"}
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": state.global_step})
        if self.store is not None:
            self._append(result)
        if result.get("alarm"):
            message = (f"traitmon: EM alarm at step {state.global_step} (monitor score "
                       f"{result['monitor_score']:.3f} >= {self.bundle.monitor.threshold:.3f})")
            warnings.warn(message, stacklevel=2)
            if self.stop_on_alarm:
                control.should_training_stop = True

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

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._check(state, control, model)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.on_save_flag:
            self._check(state, control, model)
        return control
