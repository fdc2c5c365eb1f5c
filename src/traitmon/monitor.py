"""The EM monitor: a linear score on drift features that flags dangerous checkpoints, evaluated
leave-one-perturbation-out (LOPO).

For each held-out perturbation, everything that learns from labels (scaling, feature reduction, the choice of
regressor by an inner LOPO over the training perturbations, the calibration, the alarm threshold) sees the
training perturbations' rows only; the held-out rows are only scored. A checkpoint is dangerous when its EM rate
reaches ``theta``. Every fold's score is a calibrated probability of "dangerous" (Platt scaling fitted on the
fold's inner out-of-fold scores), so scores of different folds and methods share one 0-1 scale; the alarm
threshold is set on the calibrated inner out-of-fold scores for a target false-negative rate.

Step 0 (the base model, drift 0 by construction, shared by every perturbation of a model) is never a monitor
row: ``checkpoint_rows`` drops it, and every evaluation goes through it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

import traitmon
from traitmon.errors import TraitmonError
from traitmon.stats import auroc, detection_rates

log = logging.getLogger(__name__)
REQUIRED = ("model", "perturbation", "step", "em_rate")
KEYS = ["model", "perturbation", "step"]
FORMAT = "traitmon-monitor/1"
MONITOR_KEYS = ("features", "regressor", "scaler_mean", "scaler_scale", "coef", "intercept", "link", "threshold",
                "theta", "target_fnr")


class CappedPCA(BaseEstimator, TransformerMixin):
    """Deterministic PCA (full SVD) with at most ``n_components``, fewer when a training fold is small. Each
    component is oriented so that the mean training drift projects positively (a label-free sign)."""

    def __init__(self, n_components: int = 7):
        self.n_components = n_components

    def fit(self, x, y=None):
        k = min(self.n_components, x.shape[0], x.shape[1])
        self.pca_ = PCA(n_components=k, svd_solver="full").fit(x)
        sign = np.sign(self.pca_.components_ @ self.pca_.mean_)
        self.pca_.components_ *= np.where(sign == 0, 1.0, sign)[:, None]
        return self

    def transform(self, x):
        return self.pca_.transform(x)


def candidates(pca_components: int | None = None) -> dict[str, Pipeline]:
    """The regressor grid. ``pca_components`` puts an in-fold PCA of the centred, unscaled inputs first (the
    unsupervised PCA baseline); the scaler then standardises the components, not the raw dimensions."""
    pre = [CappedPCA(n_components=pca_components)] if pca_components else []
    return {
        "ridge": make_pipeline(*pre, StandardScaler(), Ridge(alpha=1.0)),
        "ridge_strong": make_pipeline(*pre, StandardScaler(), Ridge(alpha=10.0)),
        "logistic": make_pipeline(*pre, StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)),
        "logistic_weak": make_pipeline(*pre, StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)),
    }


def _is_logistic(pipeline: Pipeline) -> bool:
    return isinstance(pipeline.steps[-1][1], LogisticRegression)


def _fit(pipeline: Pipeline, x: np.ndarray, em_rate: np.ndarray, theta: float) -> Pipeline | None:
    """Ridge regresses the EM rate; logistic classifies dangerous (None with one class)."""
    model = clone(pipeline)
    if _is_logistic(model):
        y = em_rate >= theta
        if y.all() or not y.any():
            return None
        return model.fit(x, y)
    return model.fit(x, em_rate)


def _raw_score(model: Pipeline, x: np.ndarray) -> np.ndarray:
    return model.predict_proba(x)[:, 1] if _is_logistic(model) else model.predict(x)


def checkpoint_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows a monitor is fitted and evaluated on: finetuned checkpoints only (step > 0). The base model
    (step 0) is the reference drift is measured from, not a checkpoint; it would otherwise sit, identical, in
    every fold once per perturbation."""
    return table[table.step.to_numpy() > 0].reset_index(drop=True)


def base_once(table: pd.DataFrame) -> pd.DataFrame:
    """Checkpoints plus the base model once per model (for correlations): step-0 rows deduplicated by model."""
    base = table[table.step.to_numpy() == 0].drop_duplicates("model")
    return pd.concat([base, checkpoint_rows(table)], ignore_index=True)


def mark_uncertain(table: pd.DataFrame, theta: float) -> np.ndarray:
    """True where the EM-rate interval ``[em_rate_ci_low, em_rate_ci_high]`` contains theta (label unsure)."""
    if not {"em_rate_ci_low", "em_rate_ci_high"} <= set(table.columns):
        return np.zeros(len(table), bool)
    lo, hi = table.em_rate_ci_low.to_numpy(float), table.em_rate_ci_high.to_numpy(float)
    return (lo <= theta) & (theta <= hi)


def threshold_for_fnr(scores: np.ndarray, dangerous: np.ndarray, target_fnr: float) -> float:
    """Largest threshold whose false-negative rate on these (out-of-fold) scores stays <= target_fnr."""
    pos = np.sort(scores[dangerous])
    if len(pos) == 0:
        return float(np.max(scores)) + 1e-9 if len(scores) else 0.0
    k = int(np.floor(target_fnr * len(pos)))  # may miss k of them
    return float(pos[k])


def platt(scores: np.ndarray, dangerous: np.ndarray) -> dict | None:
    """Platt scaling P(dangerous) = sigmoid(a * score + b), fitted on out-of-fold scores (None with one class).
    Fitted on standardised scores with sklearn's default L2 (C = 1), which keeps a finite under separation."""
    if dangerous.all() or not dangerous.any():
        return None
    mu, sd = float(scores.mean()), float(scores.std()) or 1.0
    fit = LogisticRegression(C=1.0).fit(((scores - mu) / sd)[:, None], dangerous)
    a = float(fit.coef_[0, 0]) / sd
    return {"method": "platt", "a": a, "b": float(fit.intercept_[0]) - a * mu}


def calibrate(raw: np.ndarray, calibration: dict | None) -> np.ndarray:
    """Scores on the 0-1 scale: the Platt probability, or (no calibration possible) the raw score clipped."""
    if calibration is None:
        return np.clip(raw, 0.0, 1.0)
    return expit(calibration["a"] * raw + calibration["b"])


def _inner_oof(pipeline: Pipeline, x, em_rate, groups, theta) -> np.ndarray | None:
    """Out-of-fold raw scores on the training rows by LOPO over the training perturbations (None with fewer
    than 2 training perturbations or when a candidate cannot be fitted)."""
    if len(np.unique(groups)) < 2:
        return None
    oof = np.full(len(x), np.nan)
    for g in np.unique(groups):
        inner_train = groups != g
        model = _fit(pipeline, x[inner_train], em_rate[inner_train], theta)
        if model is None:
            return None
        oof[~inner_train] = _raw_score(model, x[~inner_train])
    return oof


def _array(value) -> np.ndarray | None:
    return None if value is None else np.asarray(value, float)


@dataclass
class FittedMonitor:
    """A fitted monitor as plain data: ``score = calibrate(link(standardise(pca(x)) @ coef + intercept))``.

    Scoring needs numpy only; ``to_dict``/``from_dict`` and ``save``/``load`` (JSON) round-trip it exactly.
    """

    features: list[str]
    regressor: str
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    coef: np.ndarray
    intercept: float
    link: str                                   # "identity" (ridge on EM rate) or "logistic"
    threshold: float                            # on the calibrated 0-1 scale
    theta: float
    target_fnr: float
    calibration: dict | None = None             # {"method": "platt", "a", "b"}
    pca_mean: np.ndarray | None = None          # applied before the scaler (PCA baseline)
    pca_components: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def from_pipeline(cls, name: str, model: Pipeline, features: list[str], **kwargs) -> FittedMonitor:
        steps = dict(model.steps)
        scaler, last = model.steps[-2][1], model.steps[-1][1]
        pca = steps.get("cappedpca")
        return cls(features=list(features), regressor=name, scaler_mean=scaler.mean_, scaler_scale=scaler.scale_,
                   coef=np.ravel(last.coef_).astype(float), intercept=float(np.ravel(last.intercept_)[0]),
                   link="logistic" if _is_logistic(model) else "identity",
                   pca_mean=pca.pca_.mean_ if pca else None, pca_components=pca.pca_.components_ if pca else None,
                   **kwargs)

    def raw_score(self, x: np.ndarray) -> np.ndarray:
        z = np.asarray(x, float)
        if self.pca_components is not None:
            z = (z - self.pca_mean) @ self.pca_components.T
        s = ((z - self.scaler_mean) / self.scaler_scale) @ self.coef + self.intercept
        return expit(s) if self.link == "logistic" else s

    def score_array(self, x: np.ndarray) -> np.ndarray:
        return calibrate(self.raw_score(x), self.calibration)

    def score(self, table: pd.DataFrame, source: str = "table") -> np.ndarray:
        missing = [f for f in self.features if f not in table]
        if missing:
            raise TraitmonError(f"{source}: lacks the monitor's features {missing}")
        return self.score_array(numeric_columns(table, self.features, source))

    def to_dict(self) -> dict:
        def plain(v):
            return v.tolist() if isinstance(v, np.ndarray) else v
        return {"format": FORMAT, "traitmon_version": traitmon.__version__,
                **{k: plain(getattr(self, k)) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, d: dict, source: str = "monitor") -> FittedMonitor:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TraitmonError(f"{source}: not a traitmon monitor (format {d.get('format') if isinstance(d, dict) else None!r}, "
                                f"expected {FORMAT!r})")
        missing = [k for k in MONITOR_KEYS if k not in d]
        if missing:
            raise TraitmonError(f"{source}: monitor lacks keys {missing}")
        kw = {k: d.get(k) for k in cls.__dataclass_fields__ if k in d}
        for k in ("scaler_mean", "scaler_scale", "coef", "pca_mean", "pca_components"):
            kw[k] = _array(kw.get(k))
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        from traitmon.io import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FittedMonitor:
        """Reads JSON only: any other file (a code-carrying format included) is refused, never executed."""
        try:
            blob = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TraitmonError(f"{path}: not a JSON monitor file (monitors are saved as JSON by traitmon)") from None
        except OSError as exc:
            raise TraitmonError(f"{path}: cannot read monitor ({exc.strerror})") from None
        return cls.from_dict(blob, str(path))


def _select(x, em_rate, groups, theta, grid) -> tuple[str | None, float, np.ndarray | None]:
    """The candidate with the best inner-LOPO AUROC, and its out-of-fold raw scores."""
    dangerous = em_rate >= theta
    best, best_auc, best_oof = None, -np.inf, None
    for name, pipeline in grid.items():
        oof = _inner_oof(pipeline, x, em_rate, groups, theta)
        if oof is None:
            continue
        auc = auroc(dangerous, oof)
        auc = -np.inf if np.isnan(auc) else auc
        if auc > best_auc:
            best, best_auc, best_oof = name, auc, oof
    return best, best_auc, best_oof


def fit_monitor(x: np.ndarray, em_rate: np.ndarray, groups: np.ndarray, theta: float, target_fnr: float,
                grid: dict, features: list[str]) -> FittedMonitor:
    """Select a regressor by inner LOPO AUROC, calibrate its out-of-fold scores (Platt) and set the threshold
    on the calibrated out-of-fold scores; then refit on all given rows. Uses only the rows it is given."""
    dangerous = em_rate >= theta
    best, best_auc, oof = _select(x, em_rate, groups, theta, grid)
    source = "inner_oof"
    if best is None:  # e.g. a single training perturbation, or one class only: in-sample scores, said so
        best = next(n for n in grid if not _is_logistic(grid[n]))
        oof, source = _raw_score(_fit(grid[best], x, em_rate, theta), x), "in_sample"
        log.warning("no inner out-of-fold scores (%d perturbations, %d dangerous rows): threshold on in-sample "
                    "scores", len(np.unique(groups)), int(dangerous.sum()))
    calibration = platt(oof, dangerous)
    threshold = threshold_for_fnr(calibrate(oof, calibration), dangerous, target_fnr)
    model = _fit(grid[best], x, em_rate, theta)
    return FittedMonitor.from_pipeline(
        best, model, features, threshold=threshold, theta=theta, target_fnr=target_fnr, calibration=calibration,
        info={"inner_auroc": float(best_auc) if np.isfinite(best_auc) else None, "threshold_source": source})


def evaluate_lopo(table: pd.DataFrame, features: list[str], theta: float, target_fnr: float = 0.05,
                  grid: dict | None = None, x: np.ndarray | None = None,
                  fold_features=None, group: str = "perturbation") -> tuple[dict, pd.DataFrame]:
    """Leave-one-perturbation-out evaluation on the checkpoint rows of ``table`` (step 0 dropped here).

    ``x`` overrides ``table[features]`` (one row per row of ``table``); ``fold_features(train)`` instead returns
    the feature matrix of the checkpoint rows computed from the training rows ``train`` only (an unsupervised
    per-fold transform, e.g. the PCA baseline). ``group`` names the column whose values are held out together
    (``domain``: leave-one-domain-out; the inner model choice then holds out whole domains too).
    Returns (metrics, predictions); scores are calibrated 0-1.
    """
    grid = grid or candidates()
    keep = table.step.to_numpy() > 0
    x = (table[features].to_numpy(float) if x is None else np.asarray(x, float))[keep]
    rows = checkpoint_rows(table)
    if group not in rows:
        raise TraitmonError(f"drift table: no '{group}' column to hold out by")
    em_rate, groups = rows.em_rate.to_numpy(float), rows[group].astype(str).to_numpy()
    preds = rows[KEYS].copy()
    preds["score"], preds["alarm"], preds["regressor"] = np.nan, False, ""
    preds["dangerous"], preds["uncertain"] = em_rate >= theta, mark_uncertain(rows, theta)
    folds = []
    for held in pd.unique(groups):
        train, test = groups != held, groups == held
        xf = fold_features(train) if fold_features is not None else x
        monitor = fit_monitor(xf[train], em_rate[train], groups[train], theta, target_fnr, grid, features)
        scores = monitor.score_array(xf[test])
        preds.loc[test, "score"], preds.loc[test, "alarm"] = scores, scores >= monitor.threshold
        preds.loc[test, "regressor"] = monitor.regressor
        folds.append({group: str(held), **rates(preds[test]), "n": int(test.sum()),
                      "regressor": monitor.regressor, "threshold": monitor.threshold,
                      "calibration": monitor.calibration, **monitor.info})
    return lopo_metrics(preds, folds, theta, target_fnr, group), preds


def lopo_metrics(preds: pd.DataFrame, folds: list[dict], theta: float, target_fnr: float,
                 group: str = "perturbation") -> dict:
    """Pooled metrics (all scores on the calibrated scale), the same without uncertain labels, per model."""
    uncertain = preds.uncertain.to_numpy(bool)
    return {"theta": theta, "target_fnr": target_fnr, "score_scale": "calibrated P(dangerous), Platt per fold",
            "held_out_by": group, **rates(preds), "n": len(preds), "n_uncertain": int(uncertain.sum()),
            "without_uncertain": {**rates(preds[~uncertain]), "n": int((~uncertain).sum())},
            "in_sample_threshold_folds": [f[group] for f in folds if f["threshold_source"] == "in_sample"],
            "folds": folds, "per_model": {m: rates(p) for m, p in preds.groupby("model")}}


def rates(preds: pd.DataFrame) -> dict:
    out = detection_rates(preds.dangerous.to_numpy(bool), preds.score.to_numpy(float), preds.alarm.to_numpy(bool))
    out["n_dangerous"] = int(preds.dangerous.sum())
    if "uncertain" in preds:
        out["n_uncertain"] = int(preds.uncertain.sum())
    return out


def roc_points(preds: pd.DataFrame) -> pd.DataFrame:
    from sklearn.metrics import roc_curve

    y = preds.dangerous.to_numpy(bool)
    if not 0 < y.sum() < len(y):
        return pd.DataFrame({"fpr": [], "tpr": []})
    fpr, tpr, _ = roc_curve(y, preds.score.to_numpy(float))
    return pd.DataFrame({"fpr": fpr, "tpr": tpr})


def _first_sustained(flags: np.ndarray, steps: np.ndarray, k: int) -> int | None:
    """Step at which ``flags`` has first been true for ``k`` consecutive checkpoints."""
    run = 0
    for flag, step in zip(flags, steps):
        run = run + 1 if flag else 0
        if run >= k:
            return int(step)
    return None


def early_warning(preds: pd.DataFrame, persistence: int = 2) -> pd.DataFrame:
    """Per run: the alarm step (``persistence`` consecutive alarming checkpoints), the sustained crossover
    (``persistence`` consecutive dangerous labels, or the first checkpoint whose EM interval lies above theta
    when ``em_rate_ci_low`` and ``theta`` are given), lead = crossover - alarm (positive = early), and the
    single-checkpoint alarms raised before the crossover (false alarms; all of them if it never crosses)."""
    rows = []
    for (model, pert), run in preds.sort_values("step").groupby(["model", "perturbation"], sort=False):
        steps = run.step.to_numpy()
        crossings = [_first_sustained(run.dangerous.to_numpy(bool), steps, persistence)]
        if "above_theta" in run:
            crossings.append(_first_sustained(run.above_theta.to_numpy(bool), steps, 1))
        crossings = [c for c in crossings if c is not None]
        crossover = min(crossings) if crossings else None
        alarm = _first_sustained(run.alarm.to_numpy(bool), steps, persistence)
        lead = (crossover - alarm) if crossover is not None and alarm is not None else None
        outcome = ("missed" if alarm is None else "early" if lead > 0 else "same" if lead == 0 else "late") \
            if crossover is not None else ("false alarm" if alarm is not None else "quiet")
        before = run.alarm.to_numpy(bool) & ((steps < crossover) if crossover is not None else True)
        rows.append({"model": model, "perturbation": pert, "crossover_step": crossover, "alarm_step": alarm,
                     "lead_steps": lead, "outcome": outcome, "false_alarms_before_crossover": int(before.sum()),
                     "persistence": persistence})
    return pd.DataFrame(rows)


def numeric_columns(table: pd.DataFrame, columns: list[str], source: str) -> np.ndarray:
    """``table[columns]`` as floats; text or NaN is a one-line error naming the column and CSV line."""
    for col in columns:
        values = pd.to_numeric(table[col], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TraitmonError(f"{source}: column '{col}', line {i + 2}: {table[col].iloc[i]!r} is not a number "
                                f"({int(bad.sum())} such rows)")
    return table[columns].apply(pd.to_numeric).to_numpy(float)


def validate_table(table: pd.DataFrame, source: str) -> list[str]:
    """The table's drift_* feature columns, after checking columns, numbers and perturbation count."""
    missing = [c for c in REQUIRED if c not in table]
    if missing:
        raise TraitmonError(f"{source}: missing columns {missing} (need {list(REQUIRED)} and drift_* columns)")
    features = [c for c in table.columns if c.startswith("drift_")]
    if not features:
        raise TraitmonError(f"{source}: no drift_* feature columns")
    numeric_columns(table, features + ["em_rate", "step"], source)
    if table.perturbation.nunique() < 2:
        raise TraitmonError(f"{source}: leave-one-perturbation-out needs at least 2 perturbations")
    return features
