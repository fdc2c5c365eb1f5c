"""Tables and figures that summarise a stage across traits (and, later, the whole study)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from traitmon import plots
from traitmon.directions import cosine_matrix
from traitmon.io import write_csv
from traitmon.steering import steering_response
from traitmon.store import open_dataset


@dataclass
class DirectionSummary:
    summary: pd.DataFrame       # per trait: layer, separation, effect size, steering response
    cosines: pd.DataFrame       # trait x trait cosine of directions at their chosen layers
    figure: Figure              # separation by layer
    cosine_figure: Figure


def summarize_directions(direction_paths: list[str], steering_paths: list[str]) -> DirectionSummary:
    """Per trait: chosen layer, held-out separation and steering response; plus the cosine matrix of the
    traits' directions (each at its own chosen layer) and the separation-by-layer figure."""
    steering = {str(pd.read_csv(p)["trait"].iloc[0]): pd.read_csv(p) for p in steering_paths}
    rows, curves, vectors, chosen = [], [], {}, {}
    model = ""
    for path in direction_paths:
        ds = open_dataset(path, load=True)
        trait, layer, model = ds.attrs["trait"], int(ds.attrs["chosen_layer"]), ds.attrs["model"]
        chosen[trait] = layer
        vectors[trait] = ds["direction"].sel(layer=layer).values
        row = {"trait": trait, "layer": layer,
               "separation": float(ds.separation.sel(layer=layer)),
               "effect_size": float(ds.effect_size.sel(layer=layer)),
               "separation_last_prompt": float(ds.separation_last_prompt.sel(layer=layer)),
               "best_separation_any_layer": float(ds.separation.max()),
               "direction_norm": float(np.linalg.norm(vectors[trait]))}
        if trait in steering:
            row.update(steering_response(steering[trait]))
        rows.append(row)
        for variant, var in (("response mean", "separation"), ("last prompt token", "separation_last_prompt")):
            curves.append(pd.DataFrame({"trait": trait, "layer": ds.layer.values, "separation": ds[var].values,
                                        "variant": variant}))
    names = list(vectors)
    cos = pd.DataFrame(cosine_matrix(vectors), index=names, columns=names)
    return DirectionSummary(pd.DataFrame(rows), cos.reset_index(names="trait"),
                            plots.layer_separation(pd.concat(curves), chosen, model),
                            plots.cosine_heatmap(cos, f"Cosine of trait directions at chosen layers - {model}"))


def behavior_table(summaries: list[dict], runs: list[str], kinds: dict[str, str], out_csv: str,
                   figure: str) -> pd.DataFrame:
    """Tidy per-checkpoint behaviour table ``(model, perturbation, step, kind, em_rate, ...)``; the base
    model's summary (run ``model:base:0``) becomes step 0 of every perturbation."""
    rows = []
    for summary, run in zip(summaries, runs):
        model, perturbation, step = run.split(":")
        targets = list(kinds) if perturbation == "base" else [perturbation]
        rows += [{"model": model, "perturbation": p, "step": int(step), "kind": kinds[p], **summary} for p in targets]
    table = pd.DataFrame(rows).sort_values(["model", "perturbation", "step"]).reset_index(drop=True)
    write_csv(out_csv, table)
    plots.save(plots.em_rate_over_steps(table), figure)
    return table
