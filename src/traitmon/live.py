"""Watching a finetune while it runs: the monitor bundle, an in-training callback, and a checkpoint watcher.

A **bundle** holds everything needed to score a model in-process: the unit trait directions at their layers,
the base model's per-prompt projections (the drift reference), the measurement prompts, a fitted monitor
(optional) and provenance. Scoring a model = capture the measurement prompts at the bundle's layers only (the
forward pass stops at the deepest one), project, subtract the base, average over prompts, apply the monitor.
"""

from __future__ import annotations

import logging
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import traitmon
from traitmon.capture import capture
from traitmon.errors import TraitmonError
from traitmon.io import atomic_path, stable_hash

log = logging.getLogger(__name__)


@dataclass
class MonitorBundle:
    model_key: str
    model_hash: str                      # provenance of the base model the directions came from
    traits: list[str]
    layers: list[int]                    # per trait (hidden_states index)
    directions: np.ndarray               # (trait, hidden), unit
    prompt_ids: list[str]
    chats: list[list[dict]]
    reference: str | None
    variant: str                         # response_mean or last_prompt
    base_projection: np.ndarray          # (prompt, trait): the base model's projections
    monitor: object | None = None        # traitmon.monitor.FittedMonitor
    batch_size: int = 16
    info: dict = field(default_factory=dict)
    traitmon_version: str = traitmon.__version__

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            pickle.dump(self, fh)

    @staticmethod
    def load(path: str | Path, model=None) -> MonitorBundle:
        """Load a bundle; with ``model``, refuse one built for a different base model."""
        with open(path, "rb") as fh:
            bundle = pickle.load(fh)
        if not isinstance(bundle, MonitorBundle):
            raise TraitmonError(f"{path}: not a traitmon monitor bundle")
        if bundle.traitmon_version.split(".")[:2] != traitmon.__version__.split(".")[:2]:
            raise TraitmonError(f"{path}: bundle built by traitmon {bundle.traitmon_version}, this is "
                                f"{traitmon.__version__}; rebuild it")
        if model is not None and model_fingerprint(model) != bundle.model_hash:
            raise TraitmonError(f"{path}: bundle built for model '{bundle.model_key}' ({bundle.model_hash}), "
                                f"not for this model ({model_fingerprint(model)})")
        return bundle

    def project(self, model, tokenizer) -> np.ndarray:
        """Per-prompt projections ``(prompt, trait)`` of ``model`` (eval mode, no grad; mode restored)."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                pooled = capture(model, tokenizer, self.chats, [self.reference] * len(self.chats) if self.reference
                                 else None, sorted(set(self.layers)), self.batch_size, desc="monitor")
        finally:
            model.train(was_training)
        acts = pooled[self.variant]                              # (prompt, unique layer, hidden)
        index = {layer: j for j, layer in enumerate(sorted(set(self.layers)))}
        return np.stack([acts[:, index[layer]] @ self.directions[t] for t, layer in enumerate(self.layers)], axis=1)

    def score(self, model, tokenizer) -> dict:
        """Drift profile, monitor score and alarm of a model."""
        drift = (self.project(model, tokenizer) - self.base_projection).mean(0)
        out = {f"drift_{t}": float(d) for t, d in zip(self.traits, drift)}
        if self.monitor is not None:
            import pandas as pd

            score = float(self.monitor.score(pd.DataFrame([out]))[0])
            out.update(monitor_score=score, alarm=bool(score >= self.monitor.threshold))
        return out


def model_fingerprint(model) -> str:
    """Identity of a base model that survives LoRA training: shape and a checksum of its token embeddings."""
    from traitmon.hooks import find_decoder

    config = find_decoder(model).config
    emb = model.get_input_embeddings().weight
    return stable_hash({"type": config.model_type, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
                        "vocab": config.vocab_size, "emb": round(float(emb[:64].detach().double().sum()), 3)})


def build_bundle(model, tokenizer, model_key: str, direction_paths: list[str],
                 trait_files: list[str], per_trait_questions: int, variant: str = "response_mean",
                 monitor_path: str | None = None, batch_size: int = 16) -> MonitorBundle:
    """Bundle from a traitmon results folder's directions (and a saved monitor); ``model`` is the base model,
    whose projections become the reference."""
    from traitmon.capture import measurement_prompts
    from traitmon.drift import load_directions
    from traitmon.monitor import FittedMonitor
    from traitmon.traits import load_trait

    dirs = load_directions(direction_paths)
    traits = {t.name: t for t in map(load_trait, trait_files)}
    ids, chats, reference = measurement_prompts(traits, per_trait_questions)
    bundle = MonitorBundle(model_key, model_fingerprint(model), [str(t) for t in dirs.trait.values],
                           [int(v) for v in dirs.layer.values], dirs.direction.values.astype(np.float32), ids, chats,
                           reference, variant, np.zeros((len(ids), dirs.sizes["trait"]), np.float32),
                           FittedMonitor.load(monitor_path) if monitor_path else None, batch_size,
                           {"directions_hash": stable_hash(dirs.direction.values.tobytes().hex()[:4096])})
    bundle.base_projection = bundle.project(model, tokenizer)
    return bundle


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class TraitMonitorCallback(_trainer_callback_base()):
    """A ``transformers`` callback (Trainer, TRL's SFTTrainer) that scores the model being trained every
    ``every`` steps (and at each save): drift per trait, monitor score, alarm. Values go through the trainer's
    logging (``trainer.log`` when attached with ``attach``, else ``state.log_history``), a Zarr store if given,
    and ``self.history``; on alarm it warns or, with ``stop_on_alarm``, stops training."""

    def __init__(self, bundle: MonitorBundle, tokenizer, every: int = 50, on_save: bool = True,
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


def complete_checkpoints(run_dir: Path, sizes: dict[Path, int]) -> list[Path]:
    """Checkpoint folders whose adapter files exist and whose adapter size did not change since the last
    poll (a writer still streaming the file is not complete yet). ``sizes`` carries state between polls."""
    ready = []
    for folder in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if p.name.split("-")[-1].isdigit() else -1):
        weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
        if not (weights.is_file() and config.is_file()):
            continue
        size = weights.stat().st_size
        if sizes.get(folder) == size and size > 0 and _readable_safetensors(weights):
            ready.append(folder)
        sizes[folder] = size
    return ready


def _readable_safetensors(path: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
        return True
    except Exception:  # noqa: BLE001 - a truncated file is simply not ready
        return False


def watch(run_dir: str | Path, model_dir: str | Path, bundle: MonitorBundle, once: bool = False,
          interval: float = 10.0, timeout: float | None = None, printer=print) -> list[dict]:
    """Score each complete peft checkpoint appearing in ``run_dir``; one line per checkpoint."""
    from traitmon.models import load_model

    run_dir = Path(run_dir)
    seen: set[Path] = set()
    sizes: dict[Path, int] = {}
    results = []
    start = time.monotonic()
    while True:
        ready = complete_checkpoints(run_dir, sizes)
        if once and not ready and sizes:  # sizes need a second look to be trusted
            time.sleep(min(interval, 1.0))
            ready = complete_checkpoints(run_dir, sizes)
        for folder in ready:
            if folder in seen:
                continue
            seen.add(folder)
            model, tok = load_model(model_dir, adapter=str(folder))
            result = {"checkpoint": folder.name, **bundle.score(model, tok)}
            results.append(result)
            drift = " ".join(f"{t}={result[f'drift_{t}']:+.3f}" for t in bundle.traits)
            tail = (f" score={result['monitor_score']:.3f} {'ALARM' if result['alarm'] else 'ok'}"
                    if "monitor_score" in result else "")
            printer(f"{folder.name}: {drift}{tail}")
        if once or (timeout is not None and time.monotonic() - start > timeout):
            return results
        time.sleep(interval)
