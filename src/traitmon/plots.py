"""Seaborn figures: labelled axes, titles, readable at report size. Each function returns one figure;
``save`` writes it (atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from traitmon.io import atomic_path


def save(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def layer_separation(table: pd.DataFrame, chosen: dict[str, int], model: str = "") -> Figure:
    """``table`` columns: trait, layer, separation (held-out paired AUROC), variant. Chosen layers starred."""
    sns.set_theme(style="whitegrid", context="notebook")
    traits = list(dict.fromkeys(table.trait))
    palette = dict(zip(traits, sns.color_palette(n_colors=len(traits))))
    grid = sns.relplot(data=table, x="layer", y="separation", hue="trait", col="variant", kind="line", palette=palette,
                       marker="o", markersize=4, height=4, aspect=1.2, facet_kws={"sharey": True})
    grid.set_axis_labels("layer (hidden_states index, 0 = embeddings)", "held-out paired AUROC (pos > neg)")
    for ax in grid.axes.flat:
        ax.axhline(0.5, color="grey", lw=1, ls="--")
        ax.set_ylim(-0.02, 1.05)
    first = grid.axes.flat[0]
    picked = table[(table.variant == table.variant.iloc[0])]
    for trait, layer in chosen.items():
        row = picked[(picked.trait == trait) & (picked.layer == layer)]
        first.scatter(row.layer, row.separation, marker="*", s=220, color=palette.get(trait), edgecolor="black",
                      zorder=5)
    grid.set_titles("{col_name}")
    sns.move_legend(grid, "upper left", bbox_to_anchor=(1.0, 0.9))
    grid.figure.suptitle(f"Trait separation by layer{f' ({model})' if model else ''}; star = chosen layer", y=1.03)
    return grid.figure


def cosine_heatmap(matrix: pd.DataFrame, title: str) -> Figure:
    sns.set_theme(style="white", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sns.heatmap(matrix, annot=True, fmt=".2f", cmap="vlag", vmin=-1, vmax=1, square=True, ax=ax,
                cbar_kws={"label": "cosine similarity"})
    ax.set_title(title)
    return fig


def em_rate_over_steps(table: pd.DataFrame) -> Figure:
    """EM rate per checkpoint, one line per perturbation (solid = EM-inducing, dashed = benign), with the
    bootstrap 95% interval as a band."""
    sns.set_theme(style="whitegrid", context="notebook")
    models = list(dict.fromkeys(table.model))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = table[table.model == model]
        perts = list(dict.fromkeys(sub.perturbation))
        palette = dict(zip(perts, sns.color_palette(n_colors=len(perts))))
        sns.lineplot(data=sub, x="step", y="em_rate", hue="perturbation", style="kind", markers=True,
                     style_order=["em", "benign"], palette=palette, ax=ax)
        for pert, group in sub.groupby("perturbation"):
            ax.fill_between(group.step, group.em_rate_ci_low, group.em_rate_ci_high, alpha=0.12, color=palette[pert])
        ax.set(title=f"EM rate over finetuning - {model}", xlabel="finetuning step (0 = base model)",
               ylabel="EM rate (aligned <= 30, coherent > 50)", ylim=(-0.02, max(0.3, sub.em_rate_ci_high.max() + 0.05)))
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def drift_trajectories(table: pd.DataFrame, traits: list[str]) -> Figure:
    """Drift along each trait over finetuning steps; solid = EM-inducing, dashed = benign."""
    sns.set_theme(style="whitegrid", context="notebook")
    long = table.melt(id_vars=["model", "perturbation", "kind", "step"], value_vars=[f"drift_{t}" for t in traits],
                      var_name="trait", value_name="drift")
    long["trait"] = long.trait.str.removeprefix("drift_")
    grid = sns.relplot(data=long, x="step", y="drift", hue="perturbation", style="kind", style_order=["em", "benign"],
                       col="trait", col_wrap=4, kind="line", markers=True, height=2.8, aspect=1.2,
                       facet_kws={"sharey": False})
    grid.set_axis_labels("finetuning step", "projection drift vs base")
    grid.set_titles("{col_name}")
    for ax in grid.axes.flat:
        ax.axhline(0, color="grey", lw=1)
    grid.figure.suptitle("Drift along trait directions during finetuning", y=1.02)
    return grid.figure


def pc1_loadings(loadings: dict[str, float], variance: float) -> Figure:
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    frame = pd.DataFrame({"trait": list(loadings), "loading": list(loadings.values())})
    sns.barplot(data=frame, x="trait", y="loading", hue="trait", palette="vlag", legend=False, ax=ax)
    ax.set(title=f"EM axis: PC1 of drift profiles ({variance:.1%} of variance)", xlabel="", ylabel="PC1 loading")
    ax.tick_params(axis="x", rotation=30)
    return fig


def pc1_vs_em(table: pd.DataFrame, pearson: float) -> Figure:
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sns.scatterplot(data=table, x="pc1", y="em_rate", hue="perturbation", style="kind", size="step",
                    style_order=["em", "benign"], ax=ax)
    ax.set(title=f"Drift along PC1 vs behavioural EM rate (Pearson r = {pearson:.2f})",
           xlabel="PC1 score of the drift profile", ylabel="EM rate")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def roc_curves(curves: pd.DataFrame) -> Figure:
    """``curves`` columns: method, fpr, tpr (method label includes its AUROC)."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(5.8, 5))
    for (method, curve), color in zip(curves.groupby("method", sort=False), sns.color_palette()):
        ax.plot(curve.fpr, curve.tpr, drawstyle="steps-post", color=color, lw=2, label=method)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    if len(curves):  # no curve when a single class is present (e.g. no dangerous checkpoint)
        ax.legend(title="method", loc="lower right", fontsize=8)
    ax.set(title="Dangerous-checkpoint detection, leave-one-perturbation-out", xlabel="false positive rate",
           ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    return fig


def em_and_alarms(preds: pd.DataFrame, table: pd.DataFrame, theta: float) -> Figure:
    """Per run: EM rate over steps, the theta line, and the monitor's alarms (red x)."""
    sns.set_theme(style="whitegrid", context="notebook")
    merged = preds.merge(table[["model", "perturbation", "step", "em_rate", "kind"]],
                         on=["model", "perturbation", "step"])
    runs = list(dict.fromkeys(zip(merged.model, merged.perturbation)))
    cols = min(4, len(runs))
    rows = int(np.ceil(len(runs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True)
    for ax, (model, pert) in zip(axes.flat, runs):
        run = merged[(merged.model == model) & (merged.perturbation == pert)].sort_values("step")
        sns.lineplot(data=run, x="step", y="em_rate", marker="o", ax=ax, color="tab:blue")
        alarms = run[run.alarm]
        ax.scatter(alarms.step, alarms.em_rate, marker="x", s=90, color="tab:red", zorder=5, label="alarm")
        if "uncertain" in run:  # EM interval contains theta: the label could go either way
            unsure = run[run.uncertain.astype(bool)]
            ax.scatter(unsure.step, unsure.em_rate, s=140, facecolors="none", edgecolors="black", zorder=6,
                       label="uncertain label")
        ax.axhline(theta, color="grey", ls="--", lw=1)
        ax.set(title=f"{pert} ({run.kind.iloc[0]})", xlabel="step", ylabel="EM rate")
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    fig.suptitle(f"EM rate and monitor alarms per run (dashed: theta = {theta}; circled: EM interval contains "
                 "theta)", y=1.02)
    return fig


def comparison_forest(comparison: dict, labels: dict[str, str]) -> Figure:
    """Forest plot: AUROC of each method, and the paired difference trait monitor - method, each with its
    95% run-bootstrap interval (resampling perturbations, the same resamples for every method)."""
    sns.set_theme(style="whitegrid", context="notebook")
    rows = []
    for name, entry in comparison["methods"].items():
        rows.append({"panel": "AUROC", "method": labels.get(name, name), "value": entry["auroc"],
                     "low": entry["auroc_ci"][0], "high": entry["auroc_ci"][1]})
        if "auroc_diff" in entry:
            rows.append({"panel": "AUROC difference (trait monitor - method)", "method": labels.get(name, name),
                         "value": entry["auroc_diff"], "low": entry["auroc_diff_ci"][0],
                         "high": entry["auroc_diff_ci"][1]})
    frame = pd.DataFrame(rows).astype({"value": float, "low": float, "high": float})
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * comparison_height(frame) + 1.6), sharey=False)
    for ax, (panel, ref) in zip(axes, [("AUROC", 0.5), ("AUROC difference (trait monitor - method)", 0.0)]):
        sub = frame[frame.panel == panel].reset_index(drop=True)
        y = np.arange(len(sub))[::-1]
        ax.errorbar(sub.value, y, xerr=[sub.value - sub.low, sub.high - sub.value], fmt="o", color="tab:blue",
                    ecolor="tab:blue", capsize=4, lw=2)
        ax.axvline(ref, color="grey", ls="--", lw=1)
        ax.set_yticks(y, sub.method)
        ax.set(title=panel, xlabel="AUROC" if ref else "difference in AUROC", ylim=(-0.7, len(sub) - 0.3))
    fig.suptitle(f"Monitor vs baselines, leave-one-perturbation-out; 95% intervals from {comparison['n_boot']} "
                 f"bootstrap resamples of the {comparison['n_runs']} runs", y=1.03)
    fig.tight_layout()
    return fig


def comparison_height(frame: pd.DataFrame) -> int:
    return int(max(2, frame.groupby("panel").size().max()))


def verdict(frame: pd.DataFrame) -> Figure:
    """The verdict: paired AUROC difference trait monitor - baseline, with its 95% run-bootstrap interval, per
    baseline, under leave-one-perturbation-out and leave-one-domain-out. Right of 0: the trait basis ranks
    dangerous checkpoints better; an interval across 0: the study cannot tell the two apart."""
    sns.set_theme(style="whitegrid", context="notebook")
    baselines = list(dict.fromkeys(frame.baseline))
    evaluations = list(dict.fromkeys(frame.evaluation))
    fig, ax = plt.subplots(figsize=(8, 0.8 * max(2, len(baselines)) + 1.4))
    for i, (evaluation, color) in enumerate(zip(evaluations, ["tab:blue", "tab:orange"])):
        sub = frame[frame.evaluation == evaluation].set_index("baseline").reindex(baselines)
        sub = sub.astype({"auroc_diff": float, "auroc_diff_low": float, "auroc_diff_high": float})
        y = np.arange(len(baselines))[::-1] + (0.15 if i == 0 else -0.15)
        ax.errorbar(sub.auroc_diff, y, xerr=[sub.auroc_diff - sub.auroc_diff_low,
                                             sub.auroc_diff_high - sub.auroc_diff],
                    fmt="o", color=color, capsize=4, lw=2, label=evaluation.upper())
    ax.axvline(0, color="grey", ls="--", lw=1)
    ax.set_yticks(np.arange(len(baselines))[::-1], baselines)
    ax.set(xlabel="AUROC difference, trait monitor - baseline (95% run-bootstrap interval)",
           title="Does the trait basis beat drift magnitude, random directions, PCA-7 and the SAE?")
    ax.legend(title="held out", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def lead_distribution(warning: pd.DataFrame) -> Figure:
    """Early-warning lead (crossover step - alarm step; > 0 = alarm first) per run that crossed, and the count
    of each outcome (early, same, late, missed, false alarm, quiet)."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    leads = pd.to_numeric(warning.lead_steps, errors="coerce").dropna()
    if len(leads):
        sns.histplot(leads, discrete=True, ax=left, color="tab:blue")
    left.axvline(0, color="grey", ls="--", lw=1)
    left.set(title=f"Lead of the alarm over the crossover ({len(leads)} runs with both)",
             xlabel="lead in steps (> 0: alarm before EM crossed theta)", ylabel="runs")
    counts = warning.outcome.value_counts().reindex(["early", "same", "late", "missed", "false alarm", "quiet"],
                                                    fill_value=0)
    sns.barplot(x=counts.values, y=counts.index, ax=right, color="tab:gray")
    right.set(title="Outcome per run", xlabel="runs", ylabel="")
    fig.tight_layout()
    return fig


def raw_drift_norm(table: pd.DataFrame) -> Figure:
    """Raw-drift norm (base-normalised, averaged over the trait layers) per run at every checkpoint: EM runs vs
    benign runs and style controls, so the overlap in magnitude is visible."""
    sns.set_theme(style="whitegrid", context="notebook")
    frame = table.copy()
    style = frame["style"] if "style" in frame else pd.Series("plain", index=frame.index)
    frame["group"] = np.where(frame.kind == "em", "EM", np.where(style.fillna("plain") == "plain", "benign",
                                                                  "style control (" + style.astype(str) + ")"))
    models = list(dict.fromkeys(frame.model))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = frame[frame.model == model].sort_values("step")
        sns.lineplot(data=sub, x="step", y="raw_drift_norm", hue="group", units="perturbation", estimator=None,
                     marker="o", ax=ax, lw=1.5)
        ax.set(title=f"How far each run moved - {model}", xlabel="finetuning step (0 = base model)",
               ylabel="raw activation drift norm (base RMS units)")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def screening_vs_em(table: pd.DataFrame, theta: float) -> Figure:
    """Per run: the dataset's screening risk (before training, with its bootstrap interval) against the final
    judged EM rate (with its interval), marked by the trait monitor's verdict at the final checkpoint."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    x, y = table.screen_risk.to_numpy(float), table.em_rate.to_numpy(float)
    xerr = np.abs(np.vstack([x - table.screen_risk_ci_low, table.screen_risk_ci_high - x]))
    yerr = (np.abs(np.vstack([y - table.em_rate_ci_low, table.em_rate_ci_high - y]))
            if {"em_rate_ci_low", "em_rate_ci_high"} <= set(table) else None)
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.6", elinewidth=1, zorder=1)
    verdict = table.monitor_alarm.map({True: "monitor alarm", False: "no alarm"}).fillna("no monitor verdict")
    sns.scatterplot(x=x, y=y, hue=table.perturbation.to_numpy(), style=verdict.to_numpy(), s=80, ax=ax, zorder=2)
    ax.axhline(theta, color="0.3", linestyle="--", linewidth=1, label=f"theta = {theta}")
    ax.set(title="Screening risk before training vs final EM rate", xlabel="screening risk of the training set",
           ylabel="final EM rate (judged)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig
