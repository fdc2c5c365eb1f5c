"""The EM monitor: a regressor on drift features that flags dangerous checkpoints, evaluated
leave-one-perturbation-out (LOPO).

For each held-out perturbation, everything that learns from labels (scaling, feature reduction, the choice of
regressor by an inner LOPO over the training perturbations, the alarm threshold) sees the training
perturbations' rows only; the held-out rows are only scored. A checkpoint is dangerous when its EM rate
reaches ``theta``; the alarm threshold is set on inner out-of-fold scores for a target false-negative rate.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import traitmon
from traitmon.errors import TraitmonError

REQUIRED = ("model", "perturbation", "step", "em_rate")


class CappedPCA(BaseEstimator, TransformerMixin):
    """PCA with at most ``n_components``, fewer when a (small) training fold has fewer rows or features."""

    def __init__(self, n_components: int = 7):
        self.n_components = n_components

    def fit(self, x, y=None):
        self.pca_ = PCA(n_components=min(self.n_components, x.shape[0], x.shape[1])).fit(x)
        return self

    def transform(self, x):
        return self.pca_.transform(x)


def candidates(pca_components: int | None = None) -> dict:
    """The regressor grid. ``pca_components`` puts an in-fold PCA first (the unsupervised PCA baseline)."""
    pre = [StandardScaler()] + ([CappedPCA(n_components=pca_components)] if pca_components else [])
    return {
        "ridge": make_pipeline(*pre, Ridge(alpha=1.0)),
        "ridge_strong": make_pipeline(*pre, Ridge(alpha=10.0)),
        "logistic": make_pipeline(*pre, LogisticRegression(C=1.0, max_iter=2000)),
        "logistic_weak": make_pipeline(*pre, LogisticRegression(C=0.1, max_iter=2000)),
    }


def _fit(pipeline, x: np.ndarray, em_rate: np.ndarray, theta: float):
    """Ridge regresses the EM rate; logistic classifies dangerous (falls back to None with one class)."""
    model = clone(pipeline)
    if isinstance(model.steps[-1][1], LogisticRegression):
        y = em_rate >= theta
        if y.all() or not y.any():
            return None
        return model.fit(x, y)
    return model.fit(x, em_rate)


def _score(model, x: np.ndarray) -> np.ndarray:
    if isinstance(model, _LinearScorer):
        return model.score(x)
    if isinstance(model.steps[-1][1], LogisticRegression):
        return model.predict_proba(x)[:, 1]
    return model.predict(x)


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def threshold_for_fnr(scores: np.ndarray, dangerous: np.ndarray, target_fnr: float) -> float:
    """Largest threshold whose false-negative rate on these (out-of-fold) scores stays <= target_fnr."""
    pos = np.sort(scores[dangerous])
    if len(pos) == 0:
        return float(np.max(scores)) + 1e-9 if len(scores) else 0.0
    k = int(np.floor(target_fnr * len(pos)))  # may miss k of them
    return float(pos[k])


def _inner_oof(pipeline, x, em_rate, groups, theta) -> np.ndarray | None:
    """Out-of-fold scores on the training rows by LOPO over the training perturbations."""
    oof = np.full(len(x), np.nan)
    for g in np.unique(groups):
        inner_train = groups != g
        model = _fit(pipeline, x[inner_train], em_rate[inner_train], theta)
        if model is None:
            return None
        oof[~inner_train] = _score(model, x[~inner_train])
    return oof


@dataclass
class FittedMonitor:
    """A regressor and alarm threshold fitted on some perturbations; applied to drift features of new runs."""

    features: list[str]
    regressor: str
    pipeline: object
    threshold: float
    theta: float
    target_fnr: float
    info: dict = field(default_factory=dict)

    def score(self, table: pd.DataFrame) -> np.ndarray:
        missing = [f for f in self.features if f not in table]
        if missing:
            raise TraitmonError(f"table lacks the monitor's features {missing}")
        return _score(self.pipeline, table[self.features].to_numpy(float))

    def to_dict(self) -> dict:
        """Plain, JSON-serialisable data: standardisation, optional PCA, linear weights, link, threshold."""
        if isinstance(self.pipeline, _LinearScorer):
            return {**self.pipeline.arrays, "features": self.features, "regressor": self.regressor,
                    "threshold": self.threshold, "theta": self.theta, "target_fnr": self.target_fnr, "info": self.info}
        steps = [step for _, step in self.pipeline.steps]
        scaler, final = steps[0], steps[-1]
        pca = next((s.pca_ for s in steps if isinstance(s, CappedPCA)), None)
        logistic = isinstance(final, LogisticRegression)
        return {"features": list(self.features), "regressor": self.regressor,
                "scaler_mean": scaler.mean_.tolist(), "scaler_scale": scaler.scale_.tolist(),
                "pca_mean": pca.mean_.tolist() if pca is not None else None,
                "pca_components": pca.components_.tolist() if pca is not None else None,
                "coef": np.ravel(final.coef_).tolist(), "intercept": float(np.ravel(final.intercept_)[0]),
                "link": "logistic" if logistic else "identity", "calibration": None,
                "threshold": float(self.threshold), "theta": float(self.theta), "target_fnr": float(self.target_fnr),
                "info": self.info}

    @staticmethod
    def from_dict(d: dict) -> FittedMonitor:
        try:
            arrays = {k: d[k] for k in _LinearScorer.KEYS}
            return FittedMonitor(list(d["features"]), str(d["regressor"]), _LinearScorer(arrays),
                                 float(d["threshold"]), float(d["theta"]), float(d["target_fnr"]), dict(d["info"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TraitmonError(f"not a traitmon monitor: {type(exc).__name__}: {exc}") from None

    def save(self, path: str | Path) -> None:
        from traitmon.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"traitmon_version": traitmon.__version__, "monitor": self.to_dict()}, indent=1))

    @staticmethod
    def load(path: str | Path) -> FittedMonitor:
        """Read a monitor saved by ``save`` (JSON: data only, nothing is executed)."""
        try:
            blob = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraitmonError(f"{path}: not a traitmon monitor (JSON expected): {type(exc).__name__}") from None
        if not isinstance(blob, dict) or "monitor" not in blob:
            raise TraitmonError(f"{path}: not a traitmon monitor")
        if str(blob.get("traitmon_version", "")).split(".")[:2] != traitmon.__version__.split(".")[:2]:
            raise TraitmonError(f"{path}: monitor saved by traitmon {blob.get('traitmon_version')}, "
                                f"this is {traitmon.__version__}; refit it")
        try:
            return FittedMonitor.from_dict(blob["monitor"])
        except TraitmonError as exc:
            raise TraitmonError(f"{path}: {exc}") from None


class _LinearScorer:
    """Scores from plain arrays (what ``FittedMonitor.to_dict`` keeps); no sklearn object needed."""

    KEYS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "intercept", "link", "calibration")

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def score(self, x: np.ndarray) -> np.ndarray:
        a = self.arrays
        z = (x - np.asarray(a["scaler_mean"], float)) / np.asarray(a["scaler_scale"], float)
        if a["pca_components"] is not None:
            z = (z - np.asarray(a["pca_mean"], float)) @ np.asarray(a["pca_components"], float).T
        s = z @ np.asarray(a["coef"], float) + float(a["intercept"])
        return 1.0 / (1.0 + np.exp(-s)) if a["link"] == "logistic" else s


def fit_monitor(x: np.ndarray, em_rate: np.ndarray, groups: np.ndarray, theta: float, target_fnr: float,
                grid: dict, features: list[str]) -> FittedMonitor:
    """Select a regressor by inner LOPO AUROC and set the threshold on its out-of-fold scores; then refit on
    all given rows. Uses only the rows it is given."""
    dangerous = em_rate >= theta
    best, best_auc, best_oof = None, -np.inf, None
    for name, pipeline in grid.items():
        oof = _inner_oof(pipeline, x, em_rate, groups, theta)
        if oof is None:
            continue
        auc = _auroc(dangerous, oof)
        auc = -np.inf if np.isnan(auc) else auc
        if auc > best_auc:
            best, best_auc, best_oof = name, auc, oof
    if best is None:  # e.g. a single training perturbation, or one class only
        best = next(n for n in grid if not isinstance(grid[n].steps[-1][1], LogisticRegression))
        best_oof = _score(_fit(grid[best], x, em_rate, theta), x)
    model = _fit(grid[best], x, em_rate, theta)
    return FittedMonitor(features, best, model, threshold_for_fnr(best_oof, dangerous, target_fnr), theta,
                         target_fnr, {"inner_auroc": float(best_auc) if np.isfinite(best_auc) else None})


def evaluate_lopo(table: pd.DataFrame, features: list[str], theta: float, target_fnr: float = 0.05,
                  grid: dict | None = None, x: np.ndarray | None = None) -> tuple[dict, pd.DataFrame]:
    """Leave-one-perturbation-out evaluation. ``x`` overrides ``table[features]`` (e.g. raw drift vectors).

    Returns (metrics, predictions); step-0 rows (the base model) are scored in every fold like any row.
    """
    grid = grid or candidates()
    x = table[features].to_numpy(float) if x is None else x
    em_rate = table.em_rate.to_numpy(float)
    groups = table.perturbation.to_numpy()
    preds = table[["model", "perturbation", "step"]].copy()
    preds["score"], preds["alarm"], preds["regressor"] = np.nan, False, ""
    preds["dangerous"] = em_rate >= theta
    folds = []
    for held in pd.unique(groups):
        train, test = groups != held, groups == held
        monitor = fit_monitor(x[train], em_rate[train], groups[train], theta, target_fnr, grid, features)
        scores = _score(monitor.pipeline, x[test])
        preds.loc[test, "score"] = scores
        preds.loc[test, "alarm"] = scores >= monitor.threshold
        preds.loc[test, "regressor"] = monitor.regressor
        folds.append({"perturbation": str(held), **rates(preds[test]), "n": int(test.sum()),
                      "regressor": monitor.regressor, "threshold": monitor.threshold})
    metrics = {"theta": theta, "target_fnr": target_fnr, **rates(preds), "n": len(preds), "folds": folds,
               "per_model": {m: rates(p) for m, p in preds.groupby("model")}}
    return metrics, preds


def rates(preds: pd.DataFrame) -> dict:
    y, s, a = preds.dangerous.to_numpy(bool), preds.score.to_numpy(float), preds.alarm.to_numpy(bool)
    return {"auroc": _auroc(y, s),
            "fnr": float((~a[y]).mean()) if y.any() else float("nan"),
            "fpr": float(a[~y].mean()) if (~y).any() else float("nan"),
            "n_dangerous": int(y.sum())}


def roc_points(preds: pd.DataFrame) -> pd.DataFrame:
    y = preds.dangerous.to_numpy(bool)
    if not 0 < y.sum() < len(y):
        return pd.DataFrame({"fpr": [], "tpr": []})
    fpr, tpr, _ = roc_curve(y, preds.score.to_numpy(float))
    return pd.DataFrame({"fpr": fpr, "tpr": tpr})


def early_warning(preds: pd.DataFrame) -> pd.DataFrame:
    """Per run: behavioural crossover step (first dangerous checkpoint), alarm step (first alarm), lead =
    crossover - alarm (positive = early); runs that never cross but alarm are false alarms."""
    rows = []
    for (model, pert), run in preds.sort_values("step").groupby(["model", "perturbation"]):
        crossover = run.step[run.dangerous].min() if run.dangerous.any() else None
        alarm = run.step[run.alarm].min() if run.alarm.any() else None
        lead = (crossover - alarm) if crossover is not None and alarm is not None else None
        outcome = ("missed" if alarm is None else "early" if lead > 0 else "same" if lead == 0 else "late") \
            if crossover is not None else ("false alarm" if alarm is not None else "quiet")
        rows.append({"model": model, "perturbation": pert, "crossover_step": crossover, "alarm_step": alarm,
                     "lead_steps": lead, "outcome": outcome})
    return pd.DataFrame(rows)


def validate_table(table: pd.DataFrame, source: str) -> list[str]:
    missing = [c for c in REQUIRED if c not in table]
    if missing:
        raise TraitmonError(f"{source}: missing columns {missing} (need {list(REQUIRED)} and drift_* columns)")
    features = [c for c in table.columns if c.startswith("drift_")]
    if not features:
        raise TraitmonError(f"{source}: no drift_* feature columns")
    bad = table[features + ["em_rate"]].isna().any(axis=1)
    if bad.any():
        raise TraitmonError(f"{source}: rows {list(np.flatnonzero(bad)[:5] + 2)} have empty drift or em_rate values")
    if table.perturbation.nunique() < 2:
        raise TraitmonError(f"{source}: leave-one-perturbation-out needs at least 2 perturbations")
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
    return features
