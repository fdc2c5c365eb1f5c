"""Statistics of the study: rank AUROC, Wilson intervals, and a bootstrap that resamples runs.

Checkpoints of one finetuning run are correlated, so every interval here resamples whole runs (a run is a
``(model, perturbation)`` pair; the base model of each model is one run of its own): a cluster bootstrap.
Every method is evaluated on the *same* resampled runs, so differences between methods are paired.

``scipy.stats.bootstrap`` resamples observations, not clusters, and its percentile interval does not skip the
resamples on which a statistic is undefined (AUROC of a resample with one class), so the cluster bootstrap is
written out here (percentile intervals over the valid resamples, their count reported).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

METRICS = ("auroc", "fnr", "fpr")
RUN = ["model", "perturbation"]


def auroc(dangerous: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half); NaN when only one class is present."""
    y = np.asarray(dangerous, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(score, float))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_rates(dangerous: np.ndarray, score: np.ndarray, alarm: np.ndarray) -> dict[str, float]:
    y, a = np.asarray(dangerous, bool), np.asarray(alarm, bool)
    return {"auroc": auroc(y, score),
            "fnr": float((~a[y]).mean()) if y.any() else float("nan"),
            "fpr": float(a[~y].mean()) if (~y).any() else float("nan")}


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (NaN for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def run_ids(frame: pd.DataFrame) -> np.ndarray:
    """One id per run; step-0 rows are the base model, one run per model whatever their perturbation label."""
    pert = np.where(frame.step.to_numpy() == 0, "<base>", frame.perturbation.astype(str).to_numpy())
    return (frame.model.astype(str).to_numpy() + "\x1f" + pert).astype(object)


def _resamples(groups: np.ndarray, n_boot: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The row indices of every run, and ``n_boot`` resamples of run numbers (with replacement)."""
    names = list(dict.fromkeys(groups))
    rows = [np.flatnonzero(groups == name) for name in names]
    rng = np.random.default_rng(seed)
    return rows, [rng.integers(0, len(names), len(names)) for _ in range(n_boot)]


def _interval(values: np.ndarray, level: float) -> list[float | None]:
    ok = values[np.isfinite(values)]
    if len(ok) == 0:
        return [None, None]
    lo, hi = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _method_rates(frames: list[pd.DataFrame], order: list[np.ndarray]) -> np.ndarray:
    """Metrics of one method (mean over its frames, e.g. random-direction seeds) on the rows ``order``."""
    values = []
    for frame, in_order in zip(frames, order):
        rates = detection_rates(frame.dangerous.to_numpy()[in_order], frame.score.to_numpy()[in_order],
                                frame.alarm.to_numpy()[in_order])
        values.append([rates[m] for m in METRICS])
    with warnings.catch_warnings():  # all seeds undefined on a resample: NaN, skipped by _interval
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.array(values, float), axis=0)


def compare_methods(preds: dict[str, pd.DataFrame | list[pd.DataFrame]], reference: str, n_boot: int = 2000,
                    seed: int = 0, level: float = 0.95) -> dict:
    """AUROC, FNR, FPR of each method with run-bootstrap intervals, and the paired difference reference - method.

    ``preds[name]``: predictions (model, perturbation, step, dangerous, score, alarm) or a list of them (seeds,
    averaged per resample). All methods are resampled by the same runs; rows are matched by run.
    """
    methods = {name: p if isinstance(p, list) else [p] for name, p in preds.items()}
    groups = run_ids(methods[reference][0])
    names = list(dict.fromkeys(groups))
    index = {name: [{g: np.flatnonzero(run_ids(f) == g) for g in names} for f in frames]
             for name, frames in methods.items()}

    def evaluate(picks: np.ndarray) -> np.ndarray:
        return np.stack([_method_rates(frames, [np.concatenate([idx[names[i]] for i in picks]) for idx in index[m]])
                         for m, frames in methods.items()])

    point = evaluate(np.arange(len(names)))
    _, resamples = _resamples(groups, n_boot, seed)
    boot = np.stack([evaluate(picks) for picks in resamples])  # (boot, method, metric)
    ref = list(methods).index(reference)
    out = {"n_runs": len(names), "n_boot": n_boot, "level": level, "seed": seed, "reference": reference,
           "methods": {}}
    for i, name in enumerate(methods):
        entry = {}
        for j, metric in enumerate(METRICS):
            entry[metric] = _clean(point[i, j])
            entry[f"{metric}_ci"] = _interval(boot[:, i, j], level)
            if i != ref:
                entry[f"{metric}_diff"] = _clean(point[ref, j] - point[i, j])
                entry[f"{metric}_diff_ci"] = _interval(boot[:, ref, j] - boot[:, i, j], level)
        entry["n_valid_resamples"] = int(np.isfinite(boot[:, i, 0]).sum())
        out["methods"][name] = entry
    return out


def correlation(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, n_boot: int = 2000,
                seed: int = 0, level: float = 0.95) -> dict:
    """Pearson and Spearman correlation with intervals from the run bootstrap (``groups``: run of each row;
    default: every row its own run)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    groups = np.arange(len(x)).astype(object) if groups is None else np.asarray(groups, object)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, groups = x[ok], y[ok], groups[ok]
    n_runs = len(set(groups))
    if len(x) < 4 or n_runs < 3 or x.std() == 0 or y.std() == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": len(x), "n_runs": n_runs}

    def both(idx: np.ndarray) -> tuple[float, float]:
        a, b = x[idx], y[idx]
        if a.std() == 0 or b.std() == 0:
            return float("nan"), float("nan")
        # Pearson of the values and of their ranks (= Spearman); np.corrcoef is fast inside the bootstrap
        return (float(np.corrcoef(a, b)[0, 1]),
                float(np.corrcoef(stats.rankdata(a), stats.rankdata(b))[0, 1]))

    rows, resamples = _resamples(groups, n_boot, seed)
    boot = np.array([both(np.concatenate([rows[i] for i in picks])) for picks in resamples])
    r, rho = both(np.arange(len(x)))
    return {"pearson": r, "pearson_ci": _interval(boot[:, 0], level), "spearman": rho,
            "spearman_ci": _interval(boot[:, 1], level), "n": len(x), "n_runs": n_runs}


def _clean(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
