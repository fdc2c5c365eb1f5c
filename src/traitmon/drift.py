"""Drift of activations along trait directions across finetuning checkpoints, and the EM axis.

For every (model, perturbation, step) the measurement prompts' activations (response mean or last prompt token,
at each trait's chosen layer) are projected on the unit trait direction, the base model's value is subtracted
per prompt, and the result is averaged over prompts: a drift profile with one value per trait.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats
from sklearn.decomposition import PCA

from traitmon.directions import unit
from traitmon.store import open_dataset, open_sweep


def load_directions(paths: list[str | Path], variant: str = "direction") -> xr.Dataset:
    """Unit directions of one model's traits: ``direction (trait, hidden)`` and ``layer (trait)``."""
    vectors, layers, names = [], [], []
    for path in paths:
        ds = open_dataset(path, load=True)
        layer = int(ds.attrs["chosen_layer"])
        names.append(ds.attrs["trait"])
        layers.append(layer)
        vectors.append(unit(ds[variant].sel(layer=layer).values.astype(np.float32)))
    return xr.Dataset({"direction": (("trait", "hidden"), np.stack(vectors)), "layer": (("trait",), layers)},
                      coords={"trait": names})


def project(activations: xr.DataArray, directions: xr.Dataset) -> xr.DataArray:
    """Projection of ``activations (..., layer, hidden)`` on each trait's direction at its layer -> ``(..., trait)``."""
    per_trait = [activations.sel(layer=int(directions.layer.sel(trait=t))).dot(
                     directions.direction.sel(trait=t), dim="hidden").expand_dims(trait=[t])
                 for t in directions.trait.values]
    return xr.concat(per_trait, dim="trait").transpose(..., "trait")


def drift_profiles(results: str | Path, model: str, perturbations: list[str], steps: list[int],
                   directions: xr.Dataset, variant: str = "response_mean") -> xr.Dataset:
    """``drift (model, perturbation, step, trait)`` and ``drift_prompt (..., prompt, trait)`` for one model."""
    sweep = open_sweep(results, [model], perturbations, steps, variables=(variant,))[variant]
    layers = sorted({int(v) for v in directions.layer.values})
    proj = project(sweep.sel(layer=layers), directions).compute()  # reads only the chosen layers
    per_prompt = proj - proj.sel(step=0)
    return xr.Dataset({"drift": per_prompt.mean("prompt"), "drift_sd": per_prompt.std("prompt"),
                       "drift_prompt": per_prompt, "projection": proj.mean("prompt")},
                      attrs={"variant": variant, "model": model})


def raw_drift(results: str | Path, model: str, perturbations: list[str], steps: list[int], layer: int,
              variant: str = "response_mean") -> xr.DataArray:
    """Mean over prompts of (activation - base activation) at one layer: ``(model, perturbation, step, hidden)``,
    the input of the unsupervised PCA baseline."""
    sweep = open_sweep(results, [model], perturbations, steps, variables=(variant,))[variant].sel(layer=layer)
    mean = sweep.mean("prompt").compute()
    return mean - mean.sel(step=0)


def em_axis(table: pd.DataFrame, traits: list[str]) -> dict:
    """PCA of drift profiles: PC1 variance share and loadings, pooled and per model; PC1 stability under
    leave-one-perturbation-out (|cosine| of fold PC1 with the pooled PC1); cross-model |cosine| of PC1."""
    cols = [f"drift_{t}" for t in traits]
    rows = table[table.step > 0]

    def pc1(frame):
        pca = PCA(n_components=min(len(cols), len(frame))).fit(frame[cols].to_numpy())
        vec = pca.components_[0] * np.sign(pca.components_[0][np.argmax(np.abs(pca.components_[0]))])
        return vec, pca.explained_variance_ratio_

    pooled_vec, pooled_ratio = pc1(rows)
    out = {"pooled": {"pc1_variance": float(pooled_ratio[0]), "variance_ratios": pooled_ratio.round(4).tolist(),
                      "loadings": dict(zip(traits, pooled_vec.round(4).tolist()))}, "per_model": {}}
    stability = {}
    for pert in rows.perturbation.unique():
        rest = rows[rows.perturbation != pert]
        if len(rest) >= 2:
            stability[pert] = float(abs(pc1(rest)[0] @ pooled_vec))
    out["lopo_pc1_cosine"] = stability
    per_model_vecs = {}
    for model, frame in rows.groupby("model"):
        if len(frame) >= 2:
            vec, ratio = pc1(frame)
            per_model_vecs[model] = vec
            out["per_model"][model] = {"pc1_variance": float(ratio[0]), "loadings": dict(zip(traits, vec.round(4).tolist()))}
    names = list(per_model_vecs)
    out["cross_model_pc1_cosine"] = {f"{a}|{b}": float(abs(per_model_vecs[a] @ per_model_vecs[b]))
                                     for i, a in enumerate(names) for b in names[i + 1:]}
    return out


def pc1_scores(table: pd.DataFrame, traits: list[str], loadings: dict[str, float]) -> np.ndarray:
    return table[[f"drift_{t}" for t in traits]].to_numpy() @ np.array([loadings[t] for t in traits])


def correlation(x: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Pearson (Fisher-z 95% CI) and Spearman (bootstrap 95% CI) correlation."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 4 or x.std() == 0 or y.std() == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": len(x)}
    r = float(stats.pearsonr(x, y).statistic)
    z, se = np.arctanh(np.clip(r, -0.9999, 0.9999)), 1 / np.sqrt(len(x) - 3)
    rho = float(stats.spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if x[idx].std() > 0 and y[idx].std() > 0:
            boots.append(stats.spearmanr(x[idx], y[idx]).statistic)
    lo, hi = np.nanquantile(boots, [0.025, 0.975]) if boots else (np.nan, np.nan)
    return {"pearson": r, "pearson_ci": [float(np.tanh(z - 1.96 * se)), float(np.tanh(z + 1.96 * se))],
            "spearman": rho, "spearman_ci": [float(lo), float(hi)], "n": len(x)}


def random_directions(hidden: int, n: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, hidden))).astype(np.float32)


def build_drift_table(results: str | Path, model: str, perturbations: list[str], steps: list[int],
                      direction_paths: list[str], behavior_csv: str, eval_logs: dict[str, str],
                      kinds: dict[str, str], variant: str = "response_mean", random_seeds: int = 5) -> dict:
    """Everything the analysis needs for one model, computed from the capture stores in one pass:

    - ``table``: ``model, perturbation, kind, step, em_rate, ..., drift_<trait>..., heldout_loss, general_ppl``
    - ``drift``: the xarray Dataset ``(model, perturbation, step, trait)`` (+ per prompt)
    - ``raw``: raw activation drift at the median chosen layer ``(model, perturbation, step, hidden)``
    - ``random``: drift along ``random_seeds`` x 7 random unit directions at the traits' layers
    """
    directions = load_directions(direction_paths)
    traits = [str(t) for t in directions.trait.values]
    drift = drift_profiles(results, model, perturbations, steps, directions, variant)
    frame = drift["drift"].sel(model=model).to_dataframe().reset_index().pivot(
        index=["perturbation", "step"], columns="trait", values="drift")
    frame.columns = [f"drift_{t}" for t in frame.columns]
    frame = frame[[f"drift_{t}" for t in traits]].reset_index()
    behavior = pd.read_csv(behavior_csv)
    behavior = behavior[behavior.model == model].drop(columns=["model", "kind"], errors="ignore")
    table = frame.merge(behavior, on=["perturbation", "step"], how="left", validate="one_to_one")
    evals = pd.concat([pd.read_csv(path).assign(perturbation=pert) for pert, path in eval_logs.items()])
    table = table.merge(evals, on=["perturbation", "step"], how="left", validate="one_to_one")
    table.insert(0, "model", model)
    table.insert(2, "kind", table.perturbation.map(kinds))

    layer = int(np.median(directions.layer.values))
    raw = raw_drift(results, model, perturbations, steps, layer, variant)
    hidden = directions.sizes["hidden"]
    sweep = open_sweep(results, [model], perturbations, steps, variables=(variant,))[variant]
    acts = sweep.sel(layer=sorted({int(v) for v in directions.layer.values})).mean("prompt").compute()
    random_rows = []
    for seed in range(random_seeds):
        rand = directions.copy()
        rand["direction"] = (("trait", "hidden"), random_directions(hidden, len(traits), seed))
        proj = project(acts, rand)
        rd = (proj - proj.sel(step=0)).sel(model=model)
        for pert in perturbations:
            for step in rd.step.values:
                random_rows.append({"model": model, "perturbation": pert, "step": int(step), "seed": seed,
                                    **{f"drift_{t}": float(rd.sel(perturbation=pert, step=step, trait=t))
                                       for t in traits}})
    return {"table": table.sort_values(["perturbation", "step"]).reset_index(drop=True), "drift": drift,
            "raw": raw.rename("raw_drift").to_dataset().assign_attrs(layer=layer, model=model),
            "random": pd.DataFrame(random_rows)}
