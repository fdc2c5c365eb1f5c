"""Magnitude baselines against the trait monitor: the comparison must be able to fail both ways.

Signal along a trait direction with equal-norm drift elsewhere: the trait monitor beats both magnitude
baselines (raw drift norm, 7-d trait drift norm). Pure magnitude (each run drifts its own way, EM runs
further): the magnitude baseline does at least as well as the monitor, and the comparison does not call the
trait basis better.
"""

import numpy as np
import pandas as pd

from traitmon.baselines import MAGNITUDE, magnitude_features
from traitmon.monitor import evaluate_lopo
from traitmon.stats import compare_methods

TRAITS = ["honesty", "helpfulness", "harmlessness", "power-seeking", "corrigibility", "sycophancy", "confidence"]
FEATURES = [f"drift_{t}" for t in TRAITS]
STEPS = (5, 10, 15, 20, 25)


def _study(drift_of, seed: int, n_em: int = 5, n_benign: int = 5) -> pd.DataFrame:
    """EM rates rise with step in EM runs; ``drift_of(run, em, step, rng)`` gives (7-d trait drift, raw drift
    norm) of a checkpoint."""
    rng = np.random.default_rng(seed)
    rows = []
    for run in range(n_em + n_benign):
        em = run < n_em
        slope = rng.uniform(0.012, 0.02)
        for step in STEPS:
            em_rate = float(np.clip(slope * step + rng.normal(0, 0.01), 0, 1)) if em else float(rng.uniform(0, 0.03))
            drift, raw_norm = drift_of(run, em, step, rng)
            rows.append({"model": "m", "perturbation": f"{'em' if em else 'ok'}-{run}", "step": step,
                         "em_rate": em_rate, "raw_drift_norm": raw_norm, **dict(zip(FEATURES, drift))})
    return magnitude_features(pd.DataFrame(rows))


def _compare(table: pd.DataFrame) -> dict:
    preds = {"trait monitor": evaluate_lopo(table, FEATURES, theta=0.15, target_fnr=0.1)[1]}
    for name, cols in MAGNITUDE.items():
        preds[name] = evaluate_lopo(table, cols, theta=0.15, target_fnr=0.1)[1]
    return compare_methods(preds, "trait monitor", n_boot=500)["methods"]


def test_signal_along_a_trait_direction_beats_equal_norm_drift_elsewhere():
    along, elsewhere = np.eye(7)[0], np.eye(7)[3]

    def drift_of(run, em, step, rng):
        # every run moves the same distance per step; only EM runs move along the honesty direction
        norm = step / 10 * (1 + rng.normal(0, 0.05))
        return (along if em else elsewhere) * norm + rng.normal(0, 0.02, 7), norm * 4

    methods = _compare(_study(drift_of, seed=0))
    assert methods["trait monitor"]["auroc"] > 0.95
    for name in MAGNITUDE:
        assert methods[name]["auroc"] < 0.85, (name, methods[name]["auroc"])
        assert methods[name]["auroc_diff_ci"][0] > 0, (name, methods[name])  # trait basis better, interval clear of 0


def test_pure_magnitude_is_matched_by_the_magnitude_baseline():
    def drift_of(run, em, step, rng):
        # each run drifts along its own random direction; EM runs go three times as far: direction says nothing
        direction = np.random.default_rng(100 + run).normal(size=7)
        norm = step / 10 * (3.0 if em else 1.0) * (1 + rng.normal(0, 0.05))
        return direction / np.linalg.norm(direction) * norm, norm * 4

    methods = _compare(_study(drift_of, seed=1))
    for name in MAGNITUDE:
        assert methods[name]["auroc"] > 0.9, (name, methods[name]["auroc"])
        assert methods[name]["auroc"] >= methods["trait monitor"]["auroc"] - 0.02
        assert not methods[name]["auroc_diff_ci"][0] > 0  # the comparison does not credit the trait basis
