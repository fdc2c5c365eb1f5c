"""The monitor bundle: everything needed to score a model in-process, as a folder of plain data.

A bundle holds the unit trait directions at their layers, the base model's per-prompt projections (the drift
reference), the measurement prompts, a fitted monitor (optional) and provenance. Scoring a model = capture the
measurement prompts at the bundle's layers only (the forward pass stops at the deepest one), project, subtract
the base, average over prompts, apply the monitor.

On disk a bundle is a folder with exactly two files: ``arrays.safetensors`` (``directions (trait, hidden)``,
``base_projection (prompt, trait)``, float32) and ``bundle.json`` (everything else, readable). Nothing in it
is executed when it is loaded: a folder with any other file (serialised Python objects, say) is refused before anything is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import traitmon
from traitmon.capture import capture
from traitmon.errors import TraitmonError
from traitmon.io import atomic_path, stable_hash
from traitmon.settings import PRECISIONS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FORMAT = "traitmon-monitor-bundle"
FORMAT_VERSION = 1
JSON_FILE, ARRAYS_FILE = "bundle.json", "arrays.safetensors"
ARRAY_NAMES = ("directions", "base_projection")
IGNORED = (".snakemake_timestamp",)  # Snakemake marks directory outputs with it; never read


@dataclass
class MonitorBundle:
    model_key: str
    model_hash: str                      # fingerprint of the base model the directions came from
    traits: list[str]
    layers: list[int]                    # per trait (hidden_states index)
    directions: np.ndarray               # (trait, hidden), unit
    prompt_ids: list[str]
    chats: list[list[dict]]
    reference: str | None
    variant: str                         # response_mean or last_prompt
    base_projection: np.ndarray          # (prompt, trait): the base model's projections
    monitor: object | None = None        # traitmon.monitor.FittedMonitor
    batch_size: int = 16                 # the capture batch size (same batches as the workflow's capture)
    model_dtype: str = "auto"            # the config's dtype for this model: how the base is loaded to score
    precision: str = "fp32"              # capture.precision: how every pass computes (the base's and each check's)
    info: dict = field(default_factory=dict)
    traitmon_version: str = traitmon.__version__

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_key": self.model_key,
                "model_fingerprint": self.model_hash, "model_dtype": self.model_dtype, "precision": self.precision,
                "traits": list(self.traits),
                "layers": [int(v) for v in self.layers], "variant": self.variant, "batch_size": int(self.batch_size),
                "prompt_ids": list(self.prompt_ids), "chats": self.chats, "reference": self.reference,
                "monitor": self.monitor.to_dict() if self.monitor is not None else None,
                "provenance": {**self.info, "traitmon_version": self.traitmon_version}}

    def save(self, path: str | Path) -> None:
        """Write the bundle folder atomically (``bundle.json`` + ``arrays.safetensors``)."""
        from safetensors.numpy import save_file

        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file({"directions": np.ascontiguousarray(self.directions, np.float32),
                       "base_projection": np.ascontiguousarray(self.base_projection, np.float32)},
                      str(tmp / ARRAYS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
            (tmp / JSON_FILE).write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")

    @staticmethod
    def load(path: str | Path, model=None) -> MonitorBundle:
        """Load a bundle folder (data only); with ``model``, refuse one built for a different base model."""
        path = Path(path)
        meta = _read_json(path)
        bundle = _from_parts(path, meta, _read_arrays(path))
        if model is not None:
            bundle.check_model(model, path)
        return bundle

    def check_model(self, model: PreTrainedModel, where: str | Path = "bundle") -> None:
        found = model_fingerprint(model)
        if found != self.model_hash:
            raise TraitmonError(f"{where}: bundle built for model '{self.model_key}' ({self.model_hash}), "
                                f"not for this model ({found})")

    def project(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
        """Per-prompt projections ``(prompt, trait)`` of ``model`` (eval mode, no grad; mode restored)."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                pooled = capture(model, tokenizer, self.chats, [self.reference] * len(self.chats) if self.reference
                                 else None, sorted(set(self.layers)), self.batch_size, desc="monitor",
                                 precision=self.precision)
        finally:
            model.train(was_training)
        acts = pooled[self.variant]                              # (prompt, unique layer, hidden)
        index = {layer: j for j, layer in enumerate(sorted(set(self.layers)))}
        return np.stack([acts[:, index[layer]] @ self.directions[t] for t, layer in enumerate(self.layers)], axis=1)

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
        """Drift profile (in units of the base model's spread across prompts, as the offline drift table),
        monitor score and alarm of a model."""
        from traitmon.drift import drift_scale

        drift = ((self.project(model, tokenizer) - self.base_projection) / drift_scale(self.base_projection)).mean(0)
        out = {f"drift_{t}": float(d) for t, d in zip(self.traits, drift)}
        if self.monitor is not None:
            import pandas as pd

            score = float(self.monitor.score(pd.DataFrame([out]))[0])
            out.update(monitor_score=score, alarm=bool(score >= self.monitor.threshold))
        return out


def _check_folder(path: Path) -> None:
    """A bundle is a folder with exactly the two expected files; anything else is refused unread."""
    if not path.exists():
        raise TraitmonError(f"{path}: no such monitor bundle")
    if not path.is_dir():
        raise TraitmonError(f"{path}: not a monitor bundle folder (a bundle is a folder with {JSON_FILE} and "
                            f"{ARRAYS_FILE}; old single-file bundles hold Python objects and are never loaded: rebuild it)")
    extra = sorted(p.name for p in path.iterdir() if p.name not in (JSON_FILE, ARRAYS_FILE, *IGNORED))
    if extra:
        raise TraitmonError(f"{path}: unexpected file(s) {extra} in a monitor bundle; refusing to load it")
    for name in (JSON_FILE, ARRAYS_FILE):
        if not (path / name).is_file():
            raise TraitmonError(f"{path}: incomplete monitor bundle: {name} is missing")


def _read_json(path: Path) -> dict:
    _check_folder(path)
    try:
        meta = json.loads((path / JSON_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraitmonError(f"{path / JSON_FILE}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TraitmonError(f"{path / JSON_FILE}: not a traitmon monitor bundle (format is not '{FORMAT}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TraitmonError(f"{path / JSON_FILE}: bundle format version {meta.get('format_version')!r}, this "
                            f"traitmon (version {traitmon.__version__}) reads version {FORMAT_VERSION}; rebuild it")
    return meta


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path / ARRAYS_FILE))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a foreign or truncated file
        raise TraitmonError(f"{path / ARRAYS_FILE}: not a readable safetensors file "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    missing = [n for n in ARRAY_NAMES if n not in arrays]
    if missing:
        raise TraitmonError(f"{path / ARRAYS_FILE}: missing arrays {missing}")
    return {n: arrays[n].astype(np.float32) for n in ARRAY_NAMES}


def _from_parts(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> MonitorBundle:
    from traitmon.monitor import FittedMonitor

    try:
        traits, layers, ids = [str(t) for t in meta["traits"]], [int(v) for v in meta["layers"]], meta["prompt_ids"]
        bundle = MonitorBundle(str(meta["model_key"]), str(meta["model_fingerprint"]), traits, layers,
                               arrays["directions"], [str(i) for i in ids], list(meta["chats"]), meta["reference"],
                               str(meta["variant"]), arrays["base_projection"], None, int(meta["batch_size"]),
                               str(meta["model_dtype"]), str(meta.get("precision", "fp32")), dict(meta["provenance"]),
                               str(meta["provenance"].get("traitmon_version", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TraitmonError(f"{path / JSON_FILE}: bad or missing field ({type(exc).__name__}: {exc})") from None
    _check_shapes(path, bundle)
    if meta.get("monitor") is not None:
        try:
            bundle.monitor = FittedMonitor.from_dict(meta["monitor"])
        except TraitmonError as exc:
            raise TraitmonError(f"{path / JSON_FILE}: monitor: {exc}") from None
        unknown = sorted(set(bundle.monitor.features) - {f"drift_{t}" for t in traits})
        if unknown:
            raise TraitmonError(f"{path / JSON_FILE}: the monitor uses features {unknown} the bundle lacks")
    return bundle


def _check_shapes(path: Path, bundle: MonitorBundle) -> None:
    n_traits, n_prompts = len(bundle.traits), len(bundle.prompt_ids)
    problems = []
    if len(bundle.layers) != n_traits:
        problems.append(f"{len(bundle.layers)} layers for {n_traits} traits")
    if len(bundle.chats) != n_prompts:
        problems.append(f"{len(bundle.chats)} chats for {n_prompts} prompt ids")
    if bundle.directions.ndim != 2 or bundle.directions.shape[0] != n_traits:
        problems.append(f"directions has shape {bundle.directions.shape}, expected ({n_traits}, hidden)")
    if bundle.base_projection.shape != (n_prompts, n_traits):
        problems.append(f"base_projection has shape {bundle.base_projection.shape}, expected ({n_prompts}, {n_traits})")
    if bundle.variant not in ("response_mean", "last_prompt"):
        problems.append(f"unknown variant '{bundle.variant}'")
    if bundle.precision not in PRECISIONS:
        problems.append(f"unknown precision '{bundle.precision}'")
    if not all(np.isfinite(a).all() for a in (bundle.directions, bundle.base_projection)):
        problems.append("arrays contain NaN or infinite values")
    if problems:
        raise TraitmonError(f"{path}: inconsistent monitor bundle: {'; '.join(problems)}")


def model_fingerprint(model: PreTrainedModel) -> str:
    """Identity of a base model that survives LoRA training and the storage dtype: shape and a checksum of its
    token embeddings rounded to bfloat16 (a float32 and a bfloat16 copy of one model agree)."""
    from traitmon.hooks import find_decoder

    config = find_decoder(model).config
    emb = model.get_input_embeddings().weight
    checksum = float(emb[:64].detach().to(torch.bfloat16).double().sum())
    return stable_hash({"type": config.model_type, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
                        "vocab": config.vocab_size, "emb": round(checksum, 3)})


def build_bundle(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_key: str,
                 direction_paths: list[str], per_trait_questions: int, variant: str, monitor_path: str | None, batch_size: int,
                 model_dtype: str, precision: str = "fp32") -> MonitorBundle:
    """Bundle from a traitmon results folder's directions (and a saved monitor); ``model`` is the base model
    (loaded in ``model_dtype``), whose projections become the reference."""
    from traitmon.capture import measurement_prompts
    from traitmon.drift import load_directions
    from traitmon.monitor import FittedMonitor
    from traitmon.precision import for_model

    precision = for_model(precision, model, "bundle")  # the live check computes as this: never "auto"
    dirs = load_directions(direction_paths, variant)
    ids, chats, reference = measurement_prompts(per_trait_questions)
    bundle = MonitorBundle(model_key, model_fingerprint(model), [str(t) for t in dirs.trait.values],
                           [int(v) for v in dirs.layer.values], dirs.direction.values.astype(np.float32), ids, chats,
                           reference, variant, np.zeros((len(ids), dirs.sizes["trait"]), np.float32),
                           FittedMonitor.load(monitor_path) if monitor_path else None, batch_size, model_dtype,
                           precision,
                           {"directions_hash": stable_hash(dirs.direction.values.tobytes().hex()[:4096]),
                            "direction_files": [Path(p).name for p in direction_paths]})
    bundle.base_projection = bundle.project(model, tokenizer)
    return bundle
