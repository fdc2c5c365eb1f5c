"""Watching a run folder: score each complete peft checkpoint as it appears, with a monitor bundle.

A watcher cannot stop a run trained elsewhere. With ``on_alarm="stop"`` or ``"rollback"``, after ``patience``
consecutive alarming checkpoints it writes a stop request (``traitmon-stop.json`` in the run folder: why, and
the last safe checkpoint's path) and ends; ``rollback`` also copies that checkpoint to ``checkpoint-safe`` (the
trainer may rotate the original away). ``traitmon watch`` then exits with ``ALARM_EXIT`` so a scheduler can act.
"""

from __future__ import annotations

import time
from pathlib import Path

from traitmon.bundle import MonitorBundle
from traitmon.callbacks import ON_ALARM, ROLLBACK_RECORD, SAFE_CHECKPOINT, check_scores
from traitmon.errors import TraitmonError

STOP_REQUEST = "traitmon-stop.json"
ALARM_EXIT = 3  # `traitmon watch` exit status after a stop request (2 is an error)


def complete_checkpoints(run_dir: Path, sizes: dict[Path, int]) -> list[Path]:
    """Checkpoint folders whose adapter files exist and whose adapter size did not change since the last
    poll (a writer still streaming the file is not complete yet). ``sizes`` carries state between polls."""
    ready = []
    numbered = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]  # not checkpoint-safe
    for folder in sorted(numbered, key=lambda p: int(p.name.split("-")[-1])):
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
          max_checkpoints: int | None = None, on_alarm: str = "warn", patience: int = 1) -> list[dict]:
    """Score each complete peft checkpoint appearing in ``run_dir``; one line per checkpoint. After a stop
    request (module docstring) the last result carries ``stop_request`` (its path) and watching ends.

    The base is loaded in ``dtype`` (default: the bundle's model dtype) and each adapter applied unmerged,
    as in the workflow's capture and in training. Polling ends after ``timeout`` seconds or once
    ``max_checkpoints`` checkpoints are scored (a run whose saves are known). A ``run_dir`` that does not exist is an error at once:
    a watcher that watches nothing must not look like a quiet run."""
    run_dir = Path(run_dir)
    if on_alarm not in ON_ALARM or int(patience) < 1:
        raise TraitmonError(f"watch: on_alarm must be one of {list(ON_ALARM)} and patience >= 1 "
                            f"(got {on_alarm!r}, {patience!r})")
    if on_alarm != "warn" and bundle.monitor is None:
        raise TraitmonError(f"watch: --on-alarm {on_alarm} needs a bundle with a fitted monitor (it has none)")
    guard = _Guard(run_dir, on_alarm, int(patience), bundle, printer)
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
                if guard.update(folder, results[-1]):
                    return results
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


class _Guard:
    """Counts consecutive alarming checkpoints and writes the stop request when there are ``patience``."""

    def __init__(self, run_dir: Path, on_alarm: str, patience: int, bundle: MonitorBundle, printer):
        self.run_dir, self.on_alarm, self.patience, self.bundle, self.printer = run_dir, on_alarm, patience, bundle, printer
        self.safe: tuple[Path, dict] | None = None
        self.streak: list[tuple[Path, dict]] = []

    def update(self, folder: Path, result: dict) -> bool:
        """True once a stop request was written (the caller stops watching)."""
        if not result.get("alarm"):
            self.safe, self.streak = (folder, result), []
            return False
        self.streak.append((folder, result))
        if self.on_alarm == "warn" or len(self.streak) < self.patience:
            return False
        result["stop_request"] = str(self.request())
        self.printer(f"traitmon: {len(self.streak)} alarming checkpoint(s) in a row: stop requested "
                     f"({result['stop_request']}); last safe checkpoint: {self.safe_path() or 'none (the base model)'}")
        return True

    def safe_path(self) -> Path | None:
        return self.safe[0] if self.safe else None

    def request(self) -> Path:
        from traitmon.io import write_json

        safe = self.safe_path()
        record = {"action": self.on_alarm, "patience": self.patience, "threshold": float(self.bundle.monitor.threshold),
                  "safe_checkpoint": str(safe.resolve()) if safe else None,
                  "safe_scores": check_scores(self.safe[1]) if self.safe else None,
                  "alarm_checkpoints": [f.name for f, _ in self.streak],
                  "alarm_scores": [check_scores(r) for _, r in self.streak]}
        if self.on_alarm == "rollback" and safe is not None:
            record["safe_checkpoint"] = str(self._copy_safe(safe, record).resolve())
            record["safe_source"] = safe.name
        write_json(self.run_dir / STOP_REQUEST, record)
        return self.run_dir / STOP_REQUEST

    def _copy_safe(self, safe: Path, record: dict) -> Path:
        import shutil

        from traitmon.io import atomic_path, write_json

        with atomic_path(self.run_dir / SAFE_CHECKPOINT) as tmp:
            tmp.mkdir()
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy2(safe / name, tmp / name)
            write_json(tmp / ROLLBACK_RECORD, {**record, "safe_source": safe.name})
        return self.run_dir / SAFE_CHECKPOINT
