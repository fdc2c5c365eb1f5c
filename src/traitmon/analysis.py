"""The study's analysis: pooled drift table, EM axis, correlations, the LOPO monitor, baselines, early warning,
a theta sweep, and the figures. Writes everything under one folder (``results/analysis``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traitmon import plots
from traitmon.baselines import loss_ppl_features, run_baselines
from traitmon.drift import correlation, em_axis, pc1_scores
from traitmon.io import write_csv, write_json
from traitmon.monitor import (
    candidates,
    early_warning,
    evaluate_lopo,
    fit_monitor,
    rates,
    roc_points,
    validate_table,
)
from traitmon.store import open_dataset

PAPER = {"auroc": 0.990, "fnr": 0.022, "fpr": 0.029, "pc1_variance": 0.655}


def monitor_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Checkpoints the monitor is evaluated on: step 0 is the reference (drift 0 by construction) and is shared
    by every perturbation of a model, so it is left out rather than counted once per perturbation."""
    return table[table.step > 0].reset_index(drop=True)


def run_analysis(drift_csvs: list[str], raw_stores: list[str], random_csvs: list[str], out: str | Path,
                 theta: float, target_fnr: float, theta_sweep: list[float]) -> dict:
    out = Path(out)
    table = pd.concat([pd.read_csv(p) for p in drift_csvs], ignore_index=True)
    traits = [c.removeprefix("drift_") for c in table.columns if c.startswith("drift_")]
    write_csv(out / "drift.csv", table)

    axis = em_axis(table, traits)
    table["pc1"] = pc1_scores(table, traits, axis["pooled"]["loadings"])
    corr = [{"feature": f"drift_{t}", **correlation(table[f"drift_{t}"], table.em_rate)} for t in traits]
    corr.append({"feature": "pc1", **correlation(table.pc1, table.em_rate)})
    write_csv(out / "correlations.csv", pd.DataFrame(corr))
    write_json(out / "em_axis.json", axis)

    rows = monitor_rows(loss_ppl_features(table))  # deltas need step 0, so before it is dropped
    features = validate_table(rows, str(out / "drift.csv"))
    metrics, preds = evaluate_lopo(rows, features, theta, target_fnr)
    metrics["paper"] = PAPER
    write_json(out / "monitor" / "metrics.json", metrics)
    write_csv(out / "monitor" / "predictions.csv", preds[["model", "perturbation", "step", "score", "alarm", "dangerous"]])
    final = fit_monitor(rows[features].to_numpy(float), rows.em_rate.to_numpy(float), rows.perturbation.to_numpy(),
                        theta, target_fnr, candidates(), features)
    final.save(out / "monitor" / "monitor.pkl")

    raw = {}
    for path in raw_stores:
        ds = open_dataset(path, load=True)
        model = ds.attrs["model"]
        sub = rows[rows.model == model]
        arr = ds["raw_drift"].sel(model=model)
        raw[model] = np.stack([arr.sel(perturbation=p, step=s).values for p, s in zip(sub.perturbation, sub.step)])
    random_tables = [group.drop(columns="seed") for _, group in
                     pd.concat([pd.read_csv(p) for p in random_csvs]).groupby("seed")]
    baselines, baseline_preds = run_baselines(rows, raw, random_tables, theta, target_fnr)
    summary = pd.concat([pd.DataFrame([{"method": "trait monitor (7-d drift)", **rates(preds)},
                                       {"method": "paper: trait monitor", **{k: PAPER[k] for k in ("auroc", "fnr", "fpr")}}]),
                         baselines], ignore_index=True)
    write_csv(out / "baselines.csv", summary)

    warning = early_warning(preds.merge(rows[["model", "perturbation", "step"]]))
    write_csv(out / "early_warning.csv", warning)
    sweep = []
    for t in theta_sweep:
        m, _ = evaluate_lopo(rows, features, t, target_fnr)
        sweep.append({"theta": t, "auroc": m["auroc"], "fnr": m["fnr"], "fpr": m["fpr"], "n_dangerous": m["n_dangerous"]})
    write_csv(out / "theta_sweep.csv", pd.DataFrame(sweep))

    figures = out / "figures"
    plots.drift_trajectories(table, traits, figures / "drift_trajectories.png")
    plots.pc1_loadings(axis["pooled"]["loadings"], axis["pooled"]["pc1_variance"], figures / "pc1_loadings.png")
    plots.pc1_vs_em(table, figures / "pc1_vs_em.png", corr[-1]["pearson"])
    curves = []
    for name, p in [("trait monitor", preds)] + list(baseline_preds.items()):
        r = rates(p)
        label = "random7, seed 0" if name == "random7" else name
        curves.append(roc_points(p).assign(method=f"{label} (AUROC {r['auroc']:.2f})"))
    plots.roc_curves(pd.concat(curves), figures / "roc_curves.png")
    plots.em_and_alarms(preds, table, theta, figures / "em_and_alarms.png")
    return {"metrics": metrics, "baselines": summary, "axis": axis, "early_warning": warning}
