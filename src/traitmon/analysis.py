"""The study's analysis: pooled drift table, EM axis, correlations, the LOPO monitor, baselines with paired
run-bootstrap intervals, early warning, a theta sweep, and the figures. Computes and returns named objects; the
command line writes them where the workflow says."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from traitmon import plots
from traitmon.baselines import loss_ppl_features, magnitude_features, run_baselines, seed_spread
from traitmon.drift import em_axis, pc1_scores
from traitmon.errors import TraitmonError
from traitmon.monitor import (
    FittedMonitor,
    base_once,
    candidates,
    checkpoint_rows,
    early_warning,
    evaluate_lopo,
    fit_monitor,
    roc_points,
    validate_table,
)
from traitmon.settings import AnalysisSettings
from traitmon.stats import compare_methods, correlation, run_ids
from traitmon.store import open_dataset

PAPER = {"auroc": 0.990, "fnr": 0.022, "fpr": 0.029, "pc1_variance": 0.655}
MONITOR = "trait monitor"
LABELS = {MONITOR: "trait monitor (7-d drift)", "pca7": "pca7 (raw activation drift)",
          "loss_ppl": "loss + perplexity", "random7": "random7 (mean over seeds)",
          "raw_norm": "raw drift norm (magnitude)", "trait_norm": "7-d trait drift norm (magnitude)",
          "sae": "sae latents (top-variance 7)"}
# the verdict's question: does the trait basis beat these?
VERDICT_METHODS = ["raw_norm", "trait_norm", "random7", "pca7", "sae"]


@dataclass
class Analysis:
    """Everything ``run_analysis`` computes, by output name."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    documents: dict[str, dict] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    monitor: FittedMonitor | None = None


def _per_row(rows: pd.DataFrame, paths: list[str], variable: str) -> dict[str, np.ndarray]:
    """One vector per checkpoint row of each model (table order) from per-model stores of ``variable``."""
    out = {}
    for path in paths:
        ds = open_dataset(path, load=True)
        model = ds.attrs["model"]
        sub, arr = rows[rows.model == model], ds[variable].sel(model=model)
        out[model] = np.stack([arr.sel(perturbation=p, step=s).values.astype(np.float32)
                               for p, s in zip(sub.perturbation, sub.step)])
    return out


def read_inputs(drift_csvs: list[str], raw_stores: list[str], random_csvs: list[str],
                sae_stores: list[str] | None = None):
    """The pooled drift table, raw drift per model (checkpoint rows, table order), random tables per seed and
    SAE latent change per model (empty without SAE stores)."""
    table = pd.concat([pd.read_csv(p, keep_default_na=False, na_values=[""]) for p in drift_csvs],
                      ignore_index=True)
    rows = checkpoint_rows(table)
    random_tables = [group.drop(columns="seed") for _, group in
                     pd.concat([pd.read_csv(p) for p in random_csvs]).groupby("seed")]
    return (table, _per_row(rows, raw_stores, "raw_drift"), random_tables,
            _per_row(rows, sae_stores or [], "latent_change"))


def correlations(table: pd.DataFrame, traits: list[str]) -> pd.DataFrame:
    """Drift (each trait, PC1) vs EM rate over checkpoints plus the base model once per model, with intervals
    from the run bootstrap."""
    rows = base_once(table)
    groups = run_ids(rows)
    out = [{"feature": f, **correlation(rows[f], rows.em_rate, groups)} for f in [f"drift_{t}" for t in traits] + ["pc1"]]
    return pd.DataFrame(out)


def comparison_table(comparison: dict, baselines: dict, evaluation: str = "lopo") -> pd.DataFrame:
    """One row per method: metrics with intervals and the paired difference (trait monitor - method)."""
    rows = []
    for name, entry in comparison["methods"].items():
        row = {"evaluation": evaluation, "method": LABELS.get(name, name), "key": name}
        for k, v in entry.items():
            if isinstance(v, list):
                row[f"{k}_low"], row[f"{k}_high"] = v
            else:
                row[k] = v
        rows.append(row)
    if evaluation == "lopo":
        rows.append({"evaluation": evaluation, "method": "paper: trait monitor", "key": "paper",
                     **{k: PAPER[k] for k in ("auroc", "fnr", "fpr")}})
    frame = pd.DataFrame(rows)
    if "random7" in baselines:
        spread = seed_spread(baselines["random7"])
        for k, v in spread.items():
            frame.loc[frame.key == "random7", k] = v
    return frame


def _answer(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "undefined (one class)"
    return "trait basis better" if low > 0 else "baseline better" if high < 0 else "cannot tell apart"


def verdict_table(comparisons: dict[str, dict]) -> pd.DataFrame:
    """Does the trait basis beat magnitude, random directions, PCA-7 and the SAE? Per evaluation (LOPO, LODO)
    and baseline: both AUROCs and the paired difference trait monitor - baseline with its run-bootstrap
    interval; ``answer`` reads the interval (excludes 0 above: trait basis better; below: baseline better)."""
    rows = []
    for evaluation, comparison in comparisons.items():
        monitor = comparison["methods"][MONITOR]
        for key in [k for k in VERDICT_METHODS if k in comparison["methods"]]:
            entry = comparison["methods"][key]
            low, high = entry["auroc_diff_ci"]
            rows.append({"evaluation": evaluation, "baseline": LABELS[key], "key": key,
                         "monitor_auroc": monitor["auroc"], "baseline_auroc": entry["auroc"],
                         "baseline_auroc_low": entry["auroc_ci"][0], "baseline_auroc_high": entry["auroc_ci"][1],
                         "auroc_diff": entry["auroc_diff"], "auroc_diff_low": low, "auroc_diff_high": high,
                         "fnr_diff": entry["fnr_diff"], "fpr_diff": entry["fpr_diff"],
                         "n_runs": comparison["n_runs"], "answer": _answer(low, high)})
    return pd.DataFrame(rows)


def controls_match(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: median final-checkpoint raw-drift norm of the EM runs and of the matched controls (benign
    runs with a style; all benign runs when none has one, said in ``controls``); ``match`` = controls >= EM."""
    last = table[table.step == table.groupby(["model", "perturbation"]).step.transform("max")]
    last = last[last.step > 0]
    rows = []
    for model, runs in last.groupby("model"):
        styled = (runs.kind == "benign") & (runs.get("style", pd.Series("plain", index=runs.index)) != "plain")
        controls = runs[styled] if styled.any() else runs[runs.kind == "benign"]
        em = runs[runs.kind == "em"]
        med_c, med_e = float(controls.raw_drift_norm.median()), float(em.raw_drift_norm.median())
        rows.append({"model": model, "final_step": int(runs.step.max()),
                     "controls": "style controls" if styled.any() else "benign runs (no style controls)",
                     "n_controls": len(controls), "n_em": len(em), "control_median_raw_drift_norm": med_c,
                     "em_median_raw_drift_norm": med_e, "ratio": med_c / med_e if med_e else float("nan"),
                     "match": bool(med_c >= med_e)})
    return pd.DataFrame(rows)


def theta_sweep(rows: pd.DataFrame, features: list[str], thetas: list[float], target_fnr: float) -> pd.DataFrame:
    out = []
    for t in thetas:
        m, _ = evaluate_lopo(rows, features, t, target_fnr)
        out.append({"theta": t, "auroc": m["auroc"], "fnr": m["fnr"], "fpr": m["fpr"],
                    "n_dangerous": m["n_dangerous"], "n_uncertain": m["n_uncertain"],
                    "auroc_without_uncertain": m["without_uncertain"]["auroc"]})
    return pd.DataFrame(out)


def warning_table(preds: pd.DataFrame, rows: pd.DataFrame, theta: float, persistence: int) -> pd.DataFrame:
    merged = preds.merge(rows[["model", "perturbation", "step"] + [c for c in ("em_rate_ci_low",) if c in rows]])
    if "em_rate_ci_low" in merged:
        merged["above_theta"] = merged.em_rate_ci_low.to_numpy(float) > theta
    return early_warning(merged, persistence)


def evaluate_methods(full: pd.DataFrame, features: list[str], raw, random_tables, sae, theta: float,
                     target_fnr: float, n_boot: int, group: str):
    """The monitor and every baseline held out by ``group``, compared on the same run resamples."""
    metrics, preds = evaluate_lopo(full, features, theta, target_fnr, group=group)
    baselines = run_baselines(full, raw, random_tables, theta, target_fnr, sae, group)
    comparison = compare_methods({MONITOR: preds, **baselines}, MONITOR, n_boot=n_boot)
    return metrics, preds, baselines, comparison


def lodo(full, features, raw, random_tables, sae, theta, target_fnr, n_boot) -> tuple[dict, dict | None]:
    """Leave-one-domain-out metrics with their comparison, or the reason it was skipped."""
    domains = checkpoint_rows(full).get("domain")
    if domains is None or domains.nunique() < 2:
        return {"skipped": "needs a domain column with at least 2 domains"}, None
    metrics, _, baselines, comparison = evaluate_methods(full, features, raw, random_tables, sae, theta,
                                                         target_fnr, n_boot, "domain")
    metrics.update(intervals=comparison["methods"][MONITOR], comparison=comparison,
                   domains=sorted(domains.astype(str).unique()))
    return metrics, comparison_table(comparison, baselines, "lodo")


def run_analysis(table: pd.DataFrame, raw: dict[str, np.ndarray], random_tables: list[pd.DataFrame],
                 settings: AnalysisSettings, source: str = "drift table",
                 sae: dict[str, np.ndarray] | None = None) -> Analysis:
    """The study's analysis under the config's ``analysis`` section (theta, target FNR, sweep, persistence)."""
    theta, target_fnr, persistence, n_boot = settings.theta, settings.target_fnr, settings.persistence, settings.n_boot
    traits = [c.removeprefix("drift_") for c in table.columns if c.startswith("drift_")]
    out = Analysis()
    axis = em_axis(table, traits)
    table = table.assign(pc1=pc1_scores(table, traits, axis["pooled"]["loadings"]))
    out.tables["drift"], out.documents["axis"] = table, axis
    out.tables["correlations"] = correlations(table, traits)

    if "raw_drift_norm" not in table:
        raise TraitmonError(f"{source}: no raw_drift_norm column (written by `traitmon drift`; rerun the drift rule)")
    full = magnitude_features(loss_ppl_features(table))  # deltas need step 0, dropped by every evaluation below
    features = validate_table(full, source)
    metrics, preds, baselines, comparison = evaluate_methods(full, features, raw, random_tables, sae, theta,
                                                             target_fnr, n_boot, "perturbation")
    lodo_metrics, lodo_table = lodo(full, features, raw, random_tables, sae, theta, target_fnr, n_boot)
    metrics.update(paper=PAPER, intervals=comparison["methods"][MONITOR], comparison=comparison,
                   persistence=persistence, lodo=lodo_metrics)
    out.documents["metrics"] = metrics
    out.tables["predictions"] = preds
    out.tables["baselines"] = pd.concat([comparison_table(comparison, baselines), lodo_table], ignore_index=True)
    comparisons = {"lopo": comparison, **({"lodo": lodo_metrics["comparison"]} if lodo_table is not None else {})}
    out.tables["verdict"] = verdict_table(comparisons)
    out.tables["controls_match"] = controls_match(full)
    rows = checkpoint_rows(full)
    out.monitor = fit_monitor(rows[features].to_numpy(float), rows.em_rate.to_numpy(float),
                              rows.perturbation.to_numpy(), theta, target_fnr, candidates(), features)
    out.tables["early_warning"] = warning_table(preds, rows, theta, persistence)
    out.tables["theta_sweep"] = theta_sweep(full, features, list(settings.theta_sweep), target_fnr)
    out.figures = figures(full, traits, axis, out.tables["correlations"], preds, baselines, comparison, theta)
    out.figures.update(verdict=plots.verdict(out.tables["verdict"]),
                       lead_distribution=plots.lead_distribution(out.tables["early_warning"]),
                       raw_drift_norm=plots.raw_drift_norm(full))
    return out


def figures(table, traits, axis, corr, preds, baselines, comparison, theta) -> dict[str, Figure]:
    curves = []
    for name, p in [(MONITOR, preds)] + list(baselines.items()):
        p = p[0] if isinstance(p, list) else p
        auc = comparison["methods"][name]["auroc"]
        label = "random7, seed 0" if name == "random7" else name
        curves.append(roc_points(p).assign(method=f"{label} (AUROC {auc:.2f})" if auc is not None else label))
    return {"drift_trajectories": plots.drift_trajectories(table, traits),
            "pc1_loadings": plots.pc1_loadings(axis["pooled"]["loadings"], axis["pooled"]["pc1_variance"]),
            "pc1_vs_em": plots.pc1_vs_em(base_once(table), float(corr.pearson.iloc[-1])),
            "roc_curves": plots.roc_curves(pd.concat(curves)),
            "em_and_alarms": plots.em_and_alarms(preds, table, theta),
            "comparison": plots.comparison_forest(comparison, LABELS)}


def screening_table(profiles: list[dict], drift: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, perturbation): the screening profile of its training set (``screen_risk`` with its
    interval, ``screen_<trait>`` means), the run's final checkpoint (step, EM rate and interval, kind) and the
    trait monitor's LOPO verdict there (``monitor_score``, ``monitor_alarm``)."""
    screen = pd.DataFrame([{"model": p["model"], "perturbation": p["perturbation"], "screen_risk": p["risk_mean"],
                            "screen_risk_ci_low": p["risk_ci_low"], "screen_risk_ci_high": p["risk_ci_high"],
                            **{f"screen_{t}": v["mean"] for t, v in p["traits"].items()}} for p in profiles])
    runs = checkpoint_rows(drift).sort_values("step").groupby(["model", "perturbation"], as_index=False).last()
    keep = [c for c in ("model", "perturbation", "kind", "step", "em_rate", "em_rate_ci_low", "em_rate_ci_high")
            if c in runs]
    table = screen.merge(runs[keep], on=["model", "perturbation"], how="inner", validate="one_to_one")
    verdict = predictions[["model", "perturbation", "step", "score", "alarm"]].rename(
        columns={"score": "monitor_score", "alarm": "monitor_alarm"})
    table = table.merge(verdict, on=["model", "perturbation", "step"], how="left", validate="one_to_one")
    return table.sort_values(["model", "perturbation"]).reset_index(drop=True)


def screening_analysis(profiles: list[dict], drift: pd.DataFrame, predictions: pd.DataFrame, theta: float,
                       target_fnr: float) -> Analysis:
    """Does the screening of a training set predict the run's final EM rate and dangerous label? Evaluated
    leave-one-perturbation-out with the monitor's calibration and threshold rules (``evaluate_lopo``), once on the
    single risk score and once on the per-trait profile; and Spearman's rho of risk vs final EM rate."""
    from scipy.stats import spearmanr

    table = screening_table(profiles, drift, predictions)
    out = Analysis(tables={"screening": table})
    metrics, preds = {"theta": theta, "target_fnr": target_fnr, "n_runs": len(table)}, []
    trait_cols = [c for c in table.columns if c.startswith("screen_") and not c.startswith("screen_risk")]
    for name, features in (("risk", ["screen_risk"]), ("profile", trait_cols)):
        if table.perturbation.nunique() < 2:
            metrics[name] = {"note": "leave-one-perturbation-out needs at least 2 perturbations"}
            continue
        m, p = evaluate_lopo(table, features, theta, target_fnr)
        metrics[name] = {k: _finite(m[k]) for k in ("auroc", "fnr", "fpr", "n", "n_dangerous", "n_uncertain") if k in m}
        preds.append(p.assign(features=name))
    rho = spearmanr(table.screen_risk, table.em_rate) if len(table) > 2 else None
    metrics["spearman_risk_vs_final_em"] = (float(rho.statistic) if rho is not None and np.isfinite(rho.statistic)
                                            else None)
    out.documents["metrics"] = metrics
    out.tables["predictions"] = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    out.figures["screening_vs_em"] = plots.screening_vs_em(table, theta)
    return out


def _finite(value):
    """NaN (e.g. AUROC with one class) as null: the metrics file stays strict JSON."""
    return None if isinstance(value, float) and not np.isfinite(value) else value
