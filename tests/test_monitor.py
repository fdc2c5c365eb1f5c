import json

import numpy as np
import pandas as pd
import pytest

from traitmon.cli import main
from traitmon.drift import em_axis
from traitmon.errors import TraitmonError
from traitmon.monitor import FittedMonitor, early_warning, evaluate_lopo, rates, threshold_for_fnr
from traitmon.stats import correlation

TRAITS = ["honesty", "helpfulness", "harmlessness", "power-seeking", "corrigibility", "sycophancy", "confidence"]


def synthetic_study(seed=0, n_em=4, n_benign=3, steps=(5, 10, 15, 20, 25)):
    """EM runs drift along a planted axis in proportion to their EM rate; benign runs drift elsewhere."""
    rng = np.random.default_rng(seed)
    axis = np.array([-0.5, -0.2, -0.6, 0.4, -0.3, 0.2, 0.1])
    axis /= np.linalg.norm(axis)
    rows = []
    for p in range(n_em + n_benign):
        em = p < n_em
        slope = rng.uniform(0.01, 0.02) if em else 0.0
        other = rng.normal(size=7) * 0.02
        for step in steps:
            em_rate = float(np.clip(slope * step + rng.normal(0, 0.01), 0, 1)) if em else float(rng.uniform(0, 0.03))
            drift = axis * em_rate * 10 + other * step / 10 + rng.normal(0, 0.05, 7)
            rows.append({"model": "m", "perturbation": f"{'em' if em else 'ok'}-{p}", "step": step,
                         "em_rate": em_rate, **{f"drift_{t}": d for t, d in zip(TRAITS, drift)}})
    return pd.DataFrame(rows), axis


def test_pca_finds_planted_axis():
    table, axis = synthetic_study()
    out = em_axis(table.assign(step=table.step), TRAITS)
    loadings = np.array([out["pooled"]["loadings"][t] for t in TRAITS])
    assert abs(loadings @ axis) > 0.95
    assert out["pooled"]["pc1_variance"] > 0.7
    assert min(out["lopo_pc1_cosine"].values()) > 0.9


def test_monitor_separates_planted_study():
    table, _ = synthetic_study()
    feats = [f"drift_{t}" for t in TRAITS]
    metrics, preds = evaluate_lopo(table, feats, theta=0.1, target_fnr=0.1)
    assert metrics["auroc"] > 0.9
    assert {f["perturbation"] for f in metrics["folds"]} == set(table.perturbation)
    assert len(preds) == len(table) and preds.score.notna().all()


def test_heldout_labels_never_reach_the_monitor():
    table, _ = synthetic_study(seed=3)
    feats = [f"drift_{t}" for t in TRAITS]
    _, before = evaluate_lopo(table, feats, theta=0.1, target_fnr=0.1)
    for held in table.perturbation.unique():
        changed = table.copy()
        mask = changed.perturbation == held
        changed.loc[mask, "em_rate"] = 1.0 - changed.loc[mask, "em_rate"]  # flip its labels completely
        _, after = evaluate_lopo(changed, feats, theta=0.1, target_fnr=0.1)
        np.testing.assert_allclose(after.score[mask], before.score[mask])
        assert (after.alarm[mask] == before.alarm[mask]).all()


def test_rates_on_hand_checked_table():
    preds = pd.DataFrame({"dangerous": [True, True, True, False, False, False, False],
                          "score":     [0.9, 0.8, 0.2, 0.7, 0.1, 0.05, 0.3],
                          "alarm":     [True, True, False, True, False, False, False]})
    r = rates(preds)
    assert r["fnr"] == pytest.approx(1 / 3)
    assert r["fpr"] == pytest.approx(1 / 4)
    # AUROC: pairs (dangerous > safe): 0.9 and 0.8 beat all 4; 0.2 beats 0.1 and 0.05 -> 10/12
    assert r["auroc"] == pytest.approx(10 / 12)


def test_threshold_meets_target_fnr_on_training_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    dangerous = np.array([False, False, True, True, True, True, True])
    t = threshold_for_fnr(scores, dangerous, target_fnr=0.2)  # may miss 1 of 5
    assert t == pytest.approx(0.6)
    assert ((scores < t) & dangerous).sum() <= 1


def test_early_warning_outcomes():
    preds = pd.DataFrame({
        "model": "m", "perturbation": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
        "step": [5, 10, 15] * 3,
        "dangerous": [False, True, True, False, False, True, False, False, False],
        "alarm": [True, True, True, False, False, False, False, True, False]})
    out = early_warning(preds, persistence=1).set_index("perturbation")  # single-checkpoint rule
    assert out.loc["a", "lead_steps"] == 5 and out.loc["a", "outcome"] == "early"
    assert out.loc["b", "outcome"] == "missed"
    assert out.loc["c", "outcome"] == "false alarm"


def test_correlation_has_intervals():
    x = np.arange(20.0)
    c = correlation(x, 2 * x + np.random.default_rng(0).normal(0, 1, 20))
    assert c["pearson"] > 0.95 and c["pearson_ci"][0] < c["pearson"] < c["pearson_ci"][1]


def test_monitor_cli_writes_metrics_predictions_and_applies(tmp_path):
    table, _ = synthetic_study()
    table["kind"] = np.where(table.perturbation.str.startswith("em"), "em", "benign")  # metadata, not a feature
    path = tmp_path / "drift.csv"
    table.to_csv(path, index=False)
    out = tmp_path / "mon"
    assert main(["monitor", "--table", str(path), "--out", str(out), "--theta", "0.15",
                 "--save-monitor", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"auroc", "fnr", "fpr", "theta", "folds"} <= set(metrics) and metrics["theta"] == 0.15
    assert set(metrics["folds"][0]) >= {"perturbation", "auroc", "fnr", "fpr", "n"}
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds.columns) == ["model", "perturbation", "step", "score", "alarm", "dangerous", "uncertain"]
    assert main(["monitor", "apply", "--monitor", str(tmp_path / "m.json"), "--table", str(path),
                 "--out", str(tmp_path / "applied.csv")]) == 0
    applied = pd.read_csv(tmp_path / "applied.csv")
    assert len(applied) == len(table) and applied.alarm.any()
    assert FittedMonitor.load(tmp_path / "m.json").features == [f"drift_{t}" for t in TRAITS]


def test_monitor_cli_rejects_table_without_features(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"model": ["m"], "perturbation": ["a"], "step": [1], "em_rate": [0.1]}).to_csv(path, index=False)
    assert main(["monitor", "--table", str(path), "--out", str(tmp_path / "o")]) == 2


def test_leave_one_domain_out_holds_every_run_of_a_domain_out_together():
    table, _ = synthetic_study(seed=3)
    table["domain"] = table.perturbation.map(lambda p: f"d{int(p.split('-')[1]) % 3}")
    feats = [f"drift_{t}" for t in TRAITS]
    metrics, before = evaluate_lopo(table, feats, theta=0.1, target_fnr=0.1, group="domain")
    assert metrics["held_out_by"] == "domain" and [f["domain"] for f in metrics["folds"]] == ["d0", "d1", "d2"]
    for held in ("d0", "d1", "d2"):
        changed = table.copy()
        mask = changed.domain == held
        changed.loc[mask, "em_rate"] = 1.0 - changed.loc[mask, "em_rate"]  # flip every label of the domain
        _, after = evaluate_lopo(changed, feats, theta=0.1, target_fnr=0.1, group="domain")
        np.testing.assert_allclose(after.score[mask], before.score[mask])
    with pytest.raises(TraitmonError, match="no 'domain' column"):
        evaluate_lopo(table.drop(columns="domain"), feats, theta=0.1, group="domain")
