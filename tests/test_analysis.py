"""The analyze command end to end on a synthetic two-model study: every declared output, the new metrics."""

import json

import numpy as np
import pandas as pd
import xarray as xr

from test_monitor import TRAITS, synthetic_study
from traitmon.cli import ANALYSIS_FIGURES, ANALYSIS_TABLES, main
from traitmon.monitor import FittedMonitor
from traitmon.store import write_dataset


def _model_inputs(folder, model, seed, scale):
    table, _ = synthetic_study(seed=seed, n_em=2, n_benign=2, steps=(5, 10, 15))
    feats = [f"drift_{t}" for t in TRAITS]
    base = table.drop_duplicates("perturbation").assign(step=0, em_rate=0.0, **dict.fromkeys(feats, 0.0))
    table = pd.concat([base, table], ignore_index=True).sort_values(["perturbation", "step"]).assign(model=model)
    table["kind"] = np.where(table.perturbation.str.startswith("em"), "em", "benign")
    table["em_rate_ci_low"] = (table.em_rate - 0.06).clip(0, 1)
    table["em_rate_ci_high"] = (table.em_rate + 0.06).clip(0, 1)
    table["heldout_loss"] = 2.0 - table.step / 100
    table["general_ppl"] = 9.0 + table.em_rate * 5
    table.to_csv(folder / f"{model}.drift.csv", index=False)
    perts, steps = sorted(table.perturbation.unique()), [0, 5, 10, 15]
    rng = np.random.default_rng(seed)
    em = table.set_index(["perturbation", "step"]).em_rate
    raw = np.stack([[em[p, s] * rng.normal(size=32) * scale + rng.normal(0, 0.01, 32) * (s > 0) for s in steps]
                    for p in perts])[None].astype(np.float32)
    ds = xr.Dataset({"raw_drift": (("model", "perturbation", "step", "hidden"), raw)},
                    coords={"model": [model], "perturbation": perts, "step": steps}, attrs={"model": model})
    write_dataset(ds, folder / f"{model}.raw.zarr")
    norms = {(p, s): float(np.linalg.norm(raw[0, i, j])) for i, p in enumerate(perts) for j, s in enumerate(steps)}
    table["raw_drift_norm"] = [norms[p, s] for p, s in zip(table.perturbation, table.step)]
    # two domains, each with an EM and a benign run; the benign run of domain d1 is a style control
    table["domain"] = table.perturbation.map(lambda p: f"d{int(p.split('-')[1]) % 2}")
    table["style"] = np.where(table.perturbation == perts[-1], "terse", "plain")
    table.to_csv(folder / f"{model}.drift.csv", index=False)
    latents = np.abs(rng.normal(size=(1, len(perts), len(steps), 40))) * raw[..., :1]
    write_dataset(xr.Dataset({"latent_change": (("model", "perturbation", "step", "latent"), latents.astype(np.float32))},
                             coords={"model": [model], "perturbation": perts, "step": steps}, attrs={"model": model}),
                  folder / f"{model}.sae.zarr")
    rand = pd.concat([table[["model", "perturbation", "step"]].assign(
        seed=k, **{f: rng.normal(0, 0.1, len(table)) for f in feats}) for k in range(2)])
    rand.to_csv(folder / f"{model}.random.csv", index=False)
    return [str(folder / f"{model}.{kind}") for kind in ("drift.csv", "raw.zarr", "random.csv", "sae.zarr")]


def test_analyze_writes_every_declared_output_with_intervals(tmp_path):
    inputs = [_model_inputs(tmp_path, m, seed, scale) for m, seed, scale in (("m", 0, 1.0), ("n", 1, 30.0))]
    out = tmp_path / "out"
    paths = {"metrics": out / "metrics.json", "predictions": out / "predictions.csv", "monitor": out / "monitor.json",
             "axis": out / "axis.json", **{f: out / f"{f}.csv" for f in ANALYSIS_TABLES.values()},
             **{f: out / f"{f}.png" for f in ANALYSIS_FIGURES.values()}}
    args = ["analyze", "--drift", *[i[0] for i in inputs], "--raw", *[i[1] for i in inputs],
            "--random", *[i[2] for i in inputs], "--sae-drift", *[i[3] for i in inputs], "--theta", "0.1",
            "--theta-sweep", "0.1", "--n-boot", "200"]
    for flag, path in paths.items():
        args += [f"--{flag.replace('_', '-')}", str(path)]
    assert main(args) == 0
    assert all(p.is_file() for p in paths.values())
    assert sorted(out.iterdir()) == sorted(paths.values())  # nothing but what was declared
    metrics = json.loads(paths["metrics"].read_text())
    for key in ("auroc_ci", "fnr_ci", "fpr_ci"):
        assert len(metrics["intervals"][key]) == 2
    methods = metrics["comparison"]["methods"]
    baselines = {"pca7", "loss_ppl", "random7", "raw_norm", "trait_norm", "sae"}
    assert set(methods) == {"trait monitor"} | baselines
    assert all("auroc_diff_ci" in methods[m] for m in baselines)
    lodo = metrics["lodo"]
    assert lodo["held_out_by"] == "domain" and lodo["domains"] == ["d0", "d1"]
    assert {f["domain"] for f in lodo["folds"]} == {"d0", "d1"}
    assert set(lodo["comparison"]["methods"]) == set(methods) and len(lodo["intervals"]["auroc_ci"]) == 2
    verdict = pd.read_csv(paths["verdict"])
    assert set(verdict.evaluation) == {"lopo", "lodo"}
    assert set(verdict.key) == {"raw_norm", "trait_norm", "random7", "pca7", "sae"}
    assert verdict.answer.isin(["trait basis better", "baseline better", "cannot tell apart"]).all()
    match = pd.read_csv(paths["controls_match"])
    assert list(match.controls) == ["style controls", "style controls"] and (match.n_controls == 1).all()
    assert metrics["comparison"]["n_runs"] == 8 and metrics["n_uncertain"] > 0
    assert metrics["without_uncertain"]["n"] == metrics["n"] - metrics["n_uncertain"]
    preds = pd.read_csv(paths["predictions"])
    assert preds.score.between(0, 1).all() and (preds.step > 0).all() and preds.uncertain.any()
    baselines = pd.read_csv(paths["baselines"])
    assert {"auroc_ci_low", "auroc_ci_high", "auroc_diff", "auroc_diff_ci_low"} <= set(baselines.columns)
    assert set(baselines.evaluation) == {"lopo", "lodo"} and "sae" in set(baselines.key)
    corr = pd.read_csv(paths["correlations"])
    assert (corr.n == 2 * 12 + 2).all() and {"pearson_ci", "n_runs"} <= set(corr.columns)
    assert FittedMonitor.load(paths["monitor"]).calibration["method"] == "platt"
    warning = pd.read_csv(paths["early_warning"])
    assert {"false_alarms_before_crossover", "persistence"} <= set(warning.columns)


def test_perturbation_domain_key_is_validated():
    import pytest

    from traitmon.config import validate_config
    from traitmon.errors import TraitmonError

    base = {"models": {"m": {"source": {"random": {}}}}, "traits": ["honesty"],
            "perturbations": {"a": {"kind": "em", "dataset": "a.jsonl", "domain": "clinic"},
                              "b": {"kind": "benign", "generator": {"domain": "medical", "stance": "benign"}}}}
    config = validate_config(base)
    assert config["perturbations"]["a"]["domain"] == "clinic" and config["analysis"]["sae"]["k"] == 16
    base["perturbations"]["a"]["domain"] = "two words"
    with pytest.raises(TraitmonError, match="domain"):
        validate_config(base)
