"""Issue 10: one calibrated score scale, step 0 in one place, run-bootstrap intervals, uncertain labels,
fair PCA baseline, persistence, and the smaller fixes. Each test fails on the code before the fix."""

import json
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest

from test_monitor import TRAITS, synthetic_study
from traitmon.analysis import correlations
from traitmon.baselines import pca_baseline
from traitmon.cli import main
from traitmon.monitor import (
    CappedPCA,
    FittedMonitor,
    candidates,
    early_warning,
    evaluate_lopo,
    fit_monitor,
    validate_table,
)
from traitmon.stats import compare_methods, wilson

FEATS = [f"drift_{t}" for t in TRAITS]


def with_base_rows(table):
    """The table as the workflow builds it: the base model's row (drift 0) as step 0 of every perturbation."""
    base = table.drop_duplicates("perturbation").assign(step=0, em_rate=0.0, **dict.fromkeys(FEATS, 0.0))
    return pd.concat([base, table], ignore_index=True)


def test_scores_of_every_fold_are_calibrated_probabilities():
    table, axis = synthetic_study(seed=1)
    # a benign run drifting against the EM axis: an uncalibrated ridge predicts a negative EM rate for it
    mask = table.perturbation == "ok-6"
    table.loc[mask, FEATS] = -3 * axis * table.loc[mask, "step"].to_numpy()[:, None] / 25
    metrics, preds = evaluate_lopo(table, FEATS, theta=0.1, target_fnr=0.1, grid={"ridge": candidates()["ridge"]})
    assert preds.score.between(0, 1).all()
    assert all(f["calibration"]["method"] == "platt" for f in metrics["folds"])
    assert all(0 <= f["threshold"] <= 1 for f in metrics["folds"])
    assert metrics["auroc"] > 0.9


def test_monitor_cli_metrics_do_not_depend_on_step0_rows(tmp_path):
    table, _ = synthetic_study(seed=2)
    outs = []
    for name, frame in (("plain", table), ("with-base", with_base_rows(table))):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        assert main(["monitor", "--table", str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / name)]) == 0
        outs.append((tmp_path / name / "metrics.json").read_text())
    assert outs[0] == outs[1]
    assert (pd.read_csv(tmp_path / "with-base" / "predictions.csv").step > 0).all()


def test_correlations_count_the_base_model_once_per_model():
    table, _ = synthetic_study(seed=4)
    table["pc1"] = table[FEATS].sum(axis=1)
    once = with_base_rows(table).drop_duplicates(["model", "step"], keep="first")
    once = pd.concat([once[once.step == 0], table], ignore_index=True)
    np.testing.assert_allclose(correlations(with_base_rows(table), TRAITS).pearson,
                               correlations(once, TRAITS).pearson)
    assert (correlations(with_base_rows(table), TRAITS).n == len(table) + 1).all()


def _preds(seed, n_runs=12, noise=0.0):
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_runs):
        danger = r % 2 == 0
        for step in (1, 2, 3):
            d = danger and step > 1
            rows.append({"model": "m", "perturbation": f"p{r}", "step": step, "dangerous": d,
                         "score": float(d) + rng.normal(0, noise)})
    frame = pd.DataFrame(rows)
    return frame.assign(alarm=frame.score > 0.5)


def test_intervals_resample_runs_not_checkpoints():
    preds = _preds(0, noise=0.6)
    doubled = pd.concat([preds, preds], ignore_index=True)
    a = compare_methods({"m": preds}, "m", n_boot=300)["methods"]["m"]
    b = compare_methods({"m": doubled}, "m", n_boot=300)["methods"]["m"]
    assert a["auroc_ci"][0] < a["auroc"] < a["auroc_ci"][1]
    np.testing.assert_allclose(a["auroc_ci"], b["auroc_ci"])  # more rows of the same runs: no narrower
    np.testing.assert_allclose(a["fnr_ci"], b["fnr_ci"])


def test_paired_differences_share_the_resamples():
    good, bad = _preds(0, noise=0.1), _preds(1, noise=3.0)
    out = compare_methods({"good": good, "same": good.copy(), "bad": bad}, "good", n_boot=300)["methods"]
    assert out["same"]["auroc_diff"] == 0 and out["same"]["auroc_diff_ci"] == [0.0, 0.0]
    assert out["bad"]["auroc_diff"] > 0 and out["bad"]["auroc_diff_ci"][0] > 0
    assert "auroc_diff" not in out["good"]


def test_wilson_matches_the_reference_figure():
    lo, hi = wilson(2, 7)
    assert lo == pytest.approx(0.08, abs=0.01) and hi == pytest.approx(0.64, abs=0.01)


def test_checkpoints_whose_em_interval_contains_theta_are_uncertain():
    table, _ = synthetic_study(seed=5)
    table["em_rate_ci_low"] = (table.em_rate - 0.05).clip(0, 1)
    table["em_rate_ci_high"] = (table.em_rate + 0.05).clip(0, 1)
    metrics, preds = evaluate_lopo(table, FEATS, theta=0.1, target_fnr=0.1)
    expected = (table.em_rate - 0.05 <= 0.1) & (0.1 <= table.em_rate + 0.05)
    assert (preds.uncertain.to_numpy() == expected.to_numpy()).all() and expected.any()
    assert metrics["n_uncertain"] == int(expected.sum())
    assert metrics["without_uncertain"]["n"] == len(table) - int(expected.sum())


def test_pca_baseline_is_unscaled_and_deterministic():
    table, _ = synthetic_study(seed=6)
    rng = np.random.default_rng(0)
    # the EM signal lives in 3 large dimensions; 300 tiny noise dimensions would dominate a standardised PCA
    signal = np.outer(table.em_rate, [5.0, -3.0, 4.0]) + rng.normal(0, 0.05, (len(table), 3))
    raw = {"m": np.hstack([signal, rng.normal(0, 1e-3, (len(table), 300))]).astype(np.float32)}
    preds = pca_baseline(table, raw, theta=0.1, target_fnr=0.1)
    y = preds.dangerous.to_numpy()
    from traitmon.stats import auroc
    assert auroc(y, preds.score.to_numpy()) > 0.9
    x = raw["m"].astype(float)
    np.testing.assert_array_equal(CappedPCA(7).fit(x).transform(x), CappedPCA(7).fit(x).transform(x))
    assert CappedPCA(7).fit(x).pca_.svd_solver == "full"


def test_pca_baseline_pools_models_into_one_regressor():
    table, _ = synthetic_study(seed=7)
    two = pd.concat([table, table.assign(model="n")], ignore_index=True)
    rng = np.random.default_rng(1)
    raw = {m: np.outer(two[two.model == m].em_rate, rng.normal(size=40)) * s + rng.normal(0, 0.01, (len(table), 40))
           for m, s in (("m", 1.0), ("n", 50.0))}
    preds = pca_baseline(two, raw, theta=0.1, target_fnr=0.1)
    assert len(preds) == len(two) and preds.score.between(0, 1).all()
    assert set(preds.groupby("perturbation").regressor.nunique()) == {1}  # one regressor per fold, all models


def test_early_warning_needs_persistent_alarms_and_sustained_crossover():
    preds = pd.DataFrame({
        "model": "m", "perturbation": ["a"] * 4 + ["b"] * 4,
        "step": [1, 2, 3, 4] * 2,
        "dangerous": [True, False, True, True, False, False, False, False],
        "alarm": [True, False, True, True, True, False, True, False]})
    out = early_warning(preds).set_index("perturbation")  # default persistence 2
    assert out.loc["a", "crossover_step"] == 4 and out.loc["a", "alarm_step"] == 4
    assert out.loc["a", "false_alarms_before_crossover"] == 2
    assert out.loc["b", "outcome"] == "quiet" and out.loc["b", "false_alarms_before_crossover"] == 2
    above = preds.assign(above_theta=[False, False, True, False] + [False] * 4)
    assert early_warning(above).set_index("perturbation").loc["a", "crossover_step"] == 3


def test_validate_table_leaves_warning_filters_alone():
    table, _ = synthetic_study()
    before = list(warnings.filters)
    validate_table(table, "t.csv")
    assert list(warnings.filters) == before


def test_in_sample_threshold_is_recorded():
    table, _ = synthetic_study(n_em=1, n_benign=1)
    metrics, _ = evaluate_lopo(table, FEATS, theta=0.1, target_fnr=0.1)
    assert sorted(metrics["in_sample_threshold_folds"]) == sorted(table.perturbation.unique())
    assert all(f["threshold_source"] == "in_sample" for f in metrics["folds"])


def test_fitted_monitor_round_trips_as_json(tmp_path):
    table, _ = synthetic_study()
    monitor = fit_monitor(table[FEATS].to_numpy(), table.em_rate.to_numpy(), table.perturbation.to_numpy(), 0.1,
                          0.1, candidates(), FEATS)
    text = json.dumps(monitor.to_dict())
    again = FittedMonitor.from_dict(json.loads(text))
    np.testing.assert_allclose(again.score(table), monitor.score(table))
    assert again.score(table).min() >= 0 and again.score(table).max() <= 1
    monitor.save(tmp_path / "m.json")
    assert FittedMonitor.load(tmp_path / "m.json").to_dict() == monitor.to_dict()


class _Payload:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(PWNED),))


PWNED = ""


def test_monitor_apply_refuses_a_pickle_without_running_it(tmp_path, capsys):
    global PWNED
    PWNED = str(tmp_path / "PWNED")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Payload()))
    table, _ = synthetic_study()
    table.to_csv(tmp_path / "t.csv", index=False)
    assert main(["monitor", "apply", "--monitor", str(tmp_path / "evil.pkl"), "--table", str(tmp_path / "t.csv"),
                 "--out", str(tmp_path / "o.csv")]) == 2
    assert not (tmp_path / "PWNED").exists() and "evil.pkl" in capsys.readouterr().err


def test_bad_tables_give_one_line_errors_naming_file_column_and_line(tmp_path, capsys):
    table, _ = synthetic_study()
    table["drift_honesty"] = table.drift_honesty.astype(object)
    table.loc[3, "drift_honesty"] = "oops"
    table.to_csv(tmp_path / "text.csv", index=False)
    assert main(["monitor", "--table", str(tmp_path / "text.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "text.csv" in err and "drift_honesty" in err and "line 5" in err and len(err.splitlines()) == 1

    good, _ = synthetic_study()
    good.to_csv(tmp_path / "good.csv", index=False)
    assert main(["monitor", "--table", str(tmp_path / "good.csv"), "--out", str(tmp_path / "o"),
                 "--save-monitor", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    good.loc[2, "drift_sycophancy"] = np.nan
    good.to_csv(tmp_path / "nan.csv", index=False)
    assert main(["monitor", "apply", "--monitor", str(tmp_path / "m.json"), "--table", str(tmp_path / "nan.csv"),
                 "--out", str(tmp_path / "a.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nan.csv" in err and "drift_sycophancy" in err and "line 4" in err and len(err.splitlines()) == 1
    assert main(["monitor", "apply", "--table", str(tmp_path / "good.csv"), "--out", str(tmp_path / "a.csv")]) == 2
    assert "--monitor" in capsys.readouterr().err
