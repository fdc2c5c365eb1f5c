"""Seaborn figures: labelled axes, titles, readable at report size. Each function writes one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from traitmon.io import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def layer_separation(table: pd.DataFrame, chosen: dict[str, int], path: str | Path, model: str = "") -> None:
    """``table`` columns: trait, layer, separation (held-out AUROC), variant."""
    sns.set_theme(style="whitegrid", context="notebook")
    grid = sns.relplot(data=table, x="layer", y="separation", hue="trait", col="variant", kind="line",
                       marker="o", markersize=4, height=4, aspect=1.3)
    grid.set_axis_labels("layer (hidden_states index, 0 = embeddings)", "held-out AUROC (pos vs neg)")
    for ax in grid.axes.flat:
        ax.axhline(0.5, color="grey", lw=1, ls="--")
        ax.set_ylim(0, 1.02)
    grid.figure.suptitle(f"Trait separation by layer{f' - {model}' if model else ''} "
                         f"(chosen: {', '.join(f'{t} {l}' for t, l in chosen.items())})", fontsize=9, y=1.02)
    _save(grid.figure, path)


def cosine_heatmap(matrix: pd.DataFrame, path: str | Path, title: str) -> None:
    sns.set_theme(style="white", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sns.heatmap(matrix, annot=True, fmt=".2f", cmap="vlag", vmin=-1, vmax=1, square=True, ax=ax,
                cbar_kws={"label": "cosine similarity"})
    ax.set_title(title)
    _save(fig, path)
