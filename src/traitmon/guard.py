"""Guarded finetuning: a fitted monitor watches traitmon's own finetune (``finetune.guard``, or a perturbation's
``guard``) and warns, stops or rolls back on a sustained alarm; and the table comparing guarded runs with their
unguarded twins.

A guarded run keeps the workflow's DAG static: after an early stop every configured checkpoint still exists.
Those before the stop step hold the adapters trained to them; the one at the stop step and every later one hold
the adapter the guard kept (``rollback``: the last non-alarming check's, ``stop``: the adapter at the stop), each
with a ``guard.json`` saying so, and their eval-log rows evaluate that kept adapter. The run folder's
``guard.json`` records every check, the alarms, the stop step and the step rolled back to.

A run killed midway resumes with a fresh guard: the checks (and the safe adapter kept in memory) before the
resumed step are not restored.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from traitmon.errors import TraitmonError
from traitmon.settings import GuardBundleSettings, GuardSettings, build

if TYPE_CHECKING:
    import pandas as pd

    from traitmon.callbacks import TraitMonitorCallback

GUARD_RECORD = "guard.json"        # in the run folder and in each checkpoint folder the guard filled
GUARD_STORE = "guard_drift.zarr"   # the checks' drift and monitor score per step, in the run folder
KEPT = "guard-kept"                # the kept adapter, saved once in the run's work folder


# ---- which runs are guarded, and their twins (the workflow imports these without torch) ----------------------
def run_guard(default: GuardSettings | None, spec: dict) -> GuardSettings | None:
    """A perturbation's guard: its own ``guard`` (``false``: none), else the study's ``finetune.guard``."""
    if "guard" not in spec or spec["guard"] is None:
        return default
    if spec["guard"] is False:
        return None
    return build(GuardSettings, spec["guard"], "guard")


def guarded_runs(perturbations: dict, default: GuardSettings | None) -> dict[str, GuardSettings]:
    """The guarded perturbations of a validated config and their guards."""
    guards = {key: run_guard(default, spec) for key, spec in perturbations.items()}
    return {key: guard for key, guard in guards.items() if guard is not None}


def unguarded_twin(perturbations: dict, key: str, guarded: Collection[str]) -> str | None:
    """The unguarded perturbation whose spec, ``guard`` aside, is the guarded ``key``'s (the first, by config
    order); None when there is none."""
    def bare(spec: dict) -> dict:
        return {k: v for k, v in spec.items() if k != "guard"}

    return next((other for other, spec in perturbations.items()
                 if other not in guarded and other != key and bare(spec) == bare(perturbations[key])), None)


# ---- the guard of one finetune --------------------------------------------------------------------------------
@dataclass
class Guard:
    """A finetune's guard: its settings and the live callback applying them."""

    settings: GuardSettings
    callback: TraitMonitorCallback


def make_guard(model_dir: str | Path, settings: GuardSettings, inputs: GuardBundleSettings,
               model_dtype: str) -> Guard:
    """Build the monitor bundle in-process, as rule ``monitor_bundle`` does (the base model's projections in
    ``model_dtype``) but with the monitor of ``settings.monitor``, and the callback that applies it."""
    from traitmon.bundle import build_bundle
    from traitmon.callbacks import TraitMonitorCallback
    from traitmon.models import load_model

    model, tok = load_model(model_dir, model_dtype)
    bundle = build_bundle(model, tok, inputs.model_key, list(inputs.directions), inputs.per_trait_questions,
                          inputs.variant, settings.monitor, inputs.batch_size, model_dtype, inputs.precision)
    del model
    unknown = sorted(set(bundle.monitor.features) - {f"drift_{t}" for t in bundle.traits})
    if unknown:
        raise TraitmonError(f"{settings.monitor}: the monitor uses features {unknown}, but the guard's directions "
                            f"give only {[f'drift_{t}' for t in bundle.traits]}")
    callback = TraitMonitorCallback(bundle, tok, every=settings.every, on_alarm=settings.on_alarm,
                                    patience=settings.patience)
    return Guard(settings, callback)


def prepare_store(guard: Guard, out_dir: Path, resumed_from: int) -> None:
    """The checks' Zarr store in the run folder: a fresh run starts it anew; a resumed one keeps the checks up
    to the resumed step (the later ones are made again)."""
    from traitmon.store import open_dataset, write_dataset

    store = out_dir / GUARD_STORE
    if store.exists() and resumed_from == 0:
        shutil.rmtree(store)
    elif store.exists():
        ds = open_dataset(store, load=True)
        write_dataset(ds.sel(step=ds.step <= resumed_from), store)
    guard.callback.store = store


def clear_records(out_dir: Path) -> None:
    """An unguarded run in a folder a guarded one used: its guard records would describe a run that is gone."""
    (out_dir / GUARD_RECORD).unlink(missing_ok=True)
    shutil.rmtree(out_dir / GUARD_STORE, ignore_errors=True)


def stop_step(callback: TraitMonitorCallback) -> int | None:
    """The step at which the guard ended training, or None (it never acted, or only warns)."""
    if callback.on_alarm == "warn" or len(callback.streak) < callback.patience:
        return None
    return int(callback.streak[-1]["step"])


@dataclass
class GuardOutcome:
    """What the guard did: the run folder's record, the checkpoints it filled (step -> the folder to copy the
    adapter from, and the ``guard.json`` of each) and the summary that goes into ``run.json``."""

    record: dict
    summary: dict
    sources: dict[int, Path] = field(default_factory=dict)
    notes: dict[int, dict] = field(default_factory=dict)


def settle(guard: Guard, model, checkpoints: list[int], work: Path, eval_log: list[dict],
           evaluate: Callable[[int], dict], resumed_from: int) -> GuardOutcome:
    """After training: keep the adapter now in ``model`` (rolled back, or at the stop) for every checkpoint from
    the stop step on, and replace their eval-log rows (in place) by that adapter's evaluation."""
    from traitmon.io import atomic_path

    callback, stopped = guard.callback, stop_step(guard.callback)
    record = guard_record(guard, stopped, resumed_from)
    summary = {k: record[k] for k in ("monitor", "on_alarm", "every", "patience", "stopped_at", "rolled_back_to",
                                      "alarmed_at", "outcome")}
    if stopped is None:
        return GuardOutcome(record, summary)
    with atomic_path(work / KEPT) as tmp:
        model.save_pretrained(str(tmp))
    kept_from = record["rolled_back_to"] if callback.on_alarm == "rollback" else stopped
    filled = [s for s in checkpoints if s >= stopped]
    row = evaluate(stopped)
    eval_log[:] = [r for r in eval_log if r["step"] < stopped] + [{**row, "step": s} for s in filled]
    note = {"filled_from": kept_from, "reason": callback.on_alarm, "stopped_at": stopped,
            "alarm_steps": record["alarm_steps"], "monitor": guard.settings.monitor,
            "what": f"the adapter of step {kept_from}, kept by the guard ({callback.on_alarm}) when it stopped "
                    f"training at step {stopped}; this step was not trained to"}
    notes = {s: {**note, "step": s} for s in filled}
    if stopped in filled:
        notes[stopped]["what"] = note["what"].replace("this step was not trained to", "the guard acted at this step")
    record["filled_steps"] = filled
    return GuardOutcome(record, summary, {s: work / KEPT for s in filled}, notes)


def guard_record(guard: Guard, stopped: int | None, resumed_from: int) -> dict:
    """The run folder's ``guard.json``: the callback's record plus every check, the stop and rollback steps."""
    callback = guard.callback
    alarms = [int(h["step"]) for h in callback.history if h.get("alarm")]
    rolled_back = callback.safe["step"] if stopped is not None and callback.on_alarm == "rollback" else None
    if stopped is not None:
        outcome = (f"stopped at step {stopped}" + (f", rolled back to step {rolled_back}"
                                                    if rolled_back is not None else ""))
    elif alarms:
        outcome = f"alarmed at steps {alarms} without acting ({callback.on_alarm}, patience {callback.patience})"
    else:
        outcome = "the monitor never alarmed; the run trained to its last step"
    # alarm_steps (the callback's): the alarming checks in a row that made it act; alarmed_at: every alarming check
    return {**callback.record(), "monitor": guard.settings.monitor, "every": guard.settings.every,
            "stopped_at": stopped, "rolled_back_to": rolled_back, "alarmed_at": alarms,
            "alarmed": bool(alarms), "outcome": outcome, "resumed_from": resumed_from, "filled_steps": [],
            "checks": [{k: (bool(v) if k == "alarm" else int(v) if k == "step" else float(v)) for k, v in h.items()}
                       for h in callback.history], "check_seconds": callback.seconds}


# ---- guarded runs against their unguarded twins ----------------------------------------------------------------
COMPARISON_COLUMNS = ["model", "perturbation", "twin", "on_alarm", "stopped_at", "rolled_back_to", "final_step",
                      "em_rate", "em_rate_ci_low", "em_rate_ci_high", "heldout_loss",
                      "twin_em_rate", "twin_em_rate_ci_low", "twin_em_rate_ci_high", "twin_heldout_loss",
                      "em_rate_avoided", "heldout_loss_cost", "note"]
NO_TWIN = "no unguarded twin (no perturbation with the same spec but no guard): compared with nothing"


def _final(em: pd.DataFrame, eval_log: pd.DataFrame, model: str, perturbation: str, step: int) -> dict:
    """The judged EM rate (with its Wilson interval) and the held-out loss of one run's checkpoint ``step``."""
    rows = em[(em.model == model) & (em.perturbation == perturbation) & (em.step == step)]
    if rows.empty:
        raise TraitmonError(f"the EM table has no row for {model}/{perturbation} at step {step}")
    losses = eval_log[eval_log.step == step].heldout_loss
    if losses.empty:
        raise TraitmonError(f"the eval log of {model}/{perturbation} has no row for step {step}")
    row = rows.iloc[0]
    return {"em_rate": row.em_rate, "em_rate_ci_low": row.em_rate_ci_low, "em_rate_ci_high": row.em_rate_ci_high,
            "heldout_loss": float(losses.iloc[0])}


def comparison_table(pairs: dict[str, str | None], em: pd.DataFrame, runs: dict[tuple[str, str], dict],
                     eval_logs: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """One row per model and guarded perturbation: its final checkpoint's judged EM rate (Wilson interval) and
    held-out loss beside its unguarded twin's (``pairs``: guarded -> twin or None), the EM rate the guard avoided
    (twin - guarded) and the held-out loss it cost (guarded - twin), the stop and rollback steps.
    ``runs`` and ``eval_logs`` are keyed by (model, perturbation): run.json contents and eval-log tables."""
    import pandas as pd

    rows = []
    for (model, key), run in sorted(runs.items()):
        if key not in pairs:
            continue
        guard, twin, step = run.get("guard") or {}, pairs[key], int(run["checkpoints"][-1])
        out = {"model": model, "perturbation": key, "twin": twin or "", "on_alarm": guard.get("on_alarm"),
               "stopped_at": guard.get("stopped_at"), "rolled_back_to": guard.get("rolled_back_to"),
               "final_step": step, **_final(em, eval_logs[model, key], model, key, step)}
        if twin:
            theirs = _final(em, eval_logs[model, twin], model, twin, step)
            out.update({f"twin_{k}": v for k, v in theirs.items()},
                       em_rate_avoided=theirs["em_rate"] - out["em_rate"],
                       heldout_loss_cost=out["heldout_loss"] - theirs["heldout_loss"])
        notes = [guard.get("outcome", ""), "" if twin else NO_TWIN]
        rows.append({**out, "note": "; ".join(n for n in notes if n)})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def read_run(path: str | Path) -> dict:
    """A finetune's run.json (the guard's summary under ``guard``)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TraitmonError(f"{path}: cannot read run.json ({type(exc).__name__}: {exc})") from None
