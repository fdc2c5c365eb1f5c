"""Watching a run folder: score each complete peft checkpoint as it appears, with a monitor bundle."""

from __future__ import annotations

import time
from pathlib import Path

from traitmon.bundle import MonitorBundle
from traitmon.errors import TraitmonError


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
          interval: float = 10.0, timeout: float | None = None, printer=print, dtype: str | None = None,
          max_checkpoints: int | None = None) -> list[dict]:
    """Score each complete peft checkpoint appearing in ``run_dir``; one line per checkpoint.

    The base is loaded in ``dtype`` (default: the bundle's model dtype) and each adapter applied unmerged,
    as in the workflow's capture and in training. Polling ends after ``timeout`` seconds or once
    ``max_checkpoints`` checkpoints are scored (a run whose saves are known). A ``run_dir`` that does not exist is an error at once:
    a watcher that watches nothing must not look like a quiet run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TraitmonError(f"{run_dir}: no such run folder" if not run_dir.exists() else
                            f"{run_dir}: not a folder (watch expects a run folder with checkpoint-* folders)")
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
            if folder not in seen:
                seen.add(folder)
                results.append(_score_checkpoint(folder, model_dir, bundle, dtype or bundle.model_dtype, printer))
        done = max_checkpoints is not None and len(results) >= max_checkpoints
        if once or done or (timeout is not None and time.monotonic() - start > timeout):
            return results
        time.sleep(interval)
        if not run_dir.is_dir():
            raise TraitmonError(f"{run_dir}: the run folder disappeared while being watched")


def _score_checkpoint(folder: Path, model_dir: str | Path, bundle: MonitorBundle, dtype: str, printer) -> dict:
    from traitmon.models import load_model

    model, tok = load_model(model_dir, dtype, adapter=str(folder))
    result = {"checkpoint": folder.name, **bundle.score(model, tok)}
    drift = " ".join(f"{t}={result[f'drift_{t}']:+.3f}" for t in bundle.traits)
    tail = (f" score={result['monitor_score']:.3f} {'ALARM' if result['alarm'] else 'ok'}"
            if "monitor_score" in result else "")
    printer(f"{folder.name}: {drift}{tail}")
    return result
