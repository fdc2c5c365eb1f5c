"""Drift of activations along trait directions across finetuning checkpoints, and the EM axis.

For every (model, perturbation, step) the measurement prompts' activations (response mean or last prompt token,
at each trait's chosen layer) are projected on the unit trait direction of the same variant, the base model's
value is subtracted per prompt, and the result is averaged over prompts: a drift profile with one value per
trait. Drift is in units of the base model's own spread: each trait's drift is divided by the standard deviation
across prompts of the base model's projections (raw drift by the base's prompt-to-prompt RMS), so models with
large activations do not dominate a pooled fit. Only the base model enters the scale (no labels, no leak).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from sklearn.decomposition import PCA

from traitmon.directions import unit
from traitmon.errors import TraitmonError
from traitmon.monitor import checkpoint_rows
from traitmon.store import open_dataset

DIRECTION_VARIABLE = {"response_mean": "direction", "last_prompt": "direction_last_prompt",
                      "direction": "direction", "direction_last_prompt": "direction_last_prompt"}
SWEEP_DIMS = ("model", "perturbation", "step", "prompt", "layer", "hidden")


def load_directions(paths: list[str | Path], variant: str) -> xr.Dataset:
    """Unit directions of one model's traits for an activation ``variant`` (response_mean or last_prompt: the
    direction extracted from the same pooling): ``direction (trait, hidden)`` and ``layer (trait)``."""
    name = DIRECTION_VARIABLE[variant]
    vectors, layers, names = [], [], []
    for path in paths:
        ds = open_dataset(path, load=True)
        layer = int(ds.attrs["chosen_layer"])
        names.append(ds.attrs["trait"])
        layers.append(layer)
        vectors.append(unit(ds[name].sel(layer=layer).values.astype(np.float32)))
    return xr.Dataset({"direction": (("trait", "hidden"), np.stack(vectors)), "layer": (("trait",), layers)},
                      coords={"trait": names}, attrs={"variant": variant})


def stack_captures(paths: list[str | Path], variable: str) -> xr.DataArray:
    """One model's capture stores as a lazy ``(model, perturbation, step, prompt, layer, hidden)`` array, placed
    by each store's ``model``/``perturbation``/``step`` attrs. The base store (step 0) is step 0 of every
    perturbation."""
    stores, versions, precisions = {}, {}, {}
    for path in paths:
        ds = open_dataset(path, chunks={})
        # stores written before the set was versioned hold version 1 (the prompt coordinates are checked too)
        versions.setdefault(int(ds.attrs.get("measurement_set", 1)), str(path))
        precisions.setdefault(str(ds.attrs.get("precision", "fp32")), str(path))  # before the attr: float32
        key = (str(ds.attrs.get("model")), str(ds.attrs.get("perturbation") or ""), int(ds.attrs.get("step", -1)))
        if variable not in ds:
            raise TraitmonError(f"{path}: capture store has no variable '{variable}'")
        if key in stores:
            raise TraitmonError(f"{path}: a second store for model/perturbation/step {key}")
        stores[key] = ds[variable].drop_attrs()
    if len(versions) > 1:
        raise TraitmonError(f"capture stores of different measurement sets: {versions} (version: path); "
                            "capture them again with one traitmon version")
    if len(precisions) > 1:
        (p1, s1), (p2, s2) = sorted(precisions.items())[:2]
        raise TraitmonError(f"{s2} was captured at {p2} but {s1} at {p1} (capture.precision auto resolves by "
                            f"machine): set capture.precision to {p1} or {p2} in the config so every capture "
                            "computes alike, and capture the stores of the other precision again")
    models = {k[0] for k in stores}
    bases = [k for k in stores if k[2] == 0]
    if len(models) != 1 or len(bases) != 1:
        raise TraitmonError(f"capture stores {[str(p) for p in paths][:3]}...: need one model and one base (step 0) "
                            f"store, got models {sorted(models)} and {len(bases)} step-0 stores")
    model, base = models.pop(), stores[bases[0]]
    perts = sorted({k[1] for k in stores if k[2] != 0})
    steps = sorted({k[2] for k in stores if k[2] != 0})
    missing = [(p, s) for p in perts for s in steps if (model, p, s) not in stores]
    if missing:
        raise TraitmonError(f"model {model}: no capture store for perturbation/step {missing[:5]}")
    per_pert = [xr.concat([base] + [stores[(model, p, s)] for s in steps], dim="step", coords="minimal",
                          compat="override", join="exact").assign_coords(step=[0] + steps) for p in perts]
    sweep = xr.concat(per_pert, dim="perturbation", coords="minimal", compat="override").assign_coords(
        perturbation=perts)
    return sweep.expand_dims(model=[model]).transpose(*SWEEP_DIMS)


def project(activations: xr.DataArray, directions: xr.Dataset) -> xr.DataArray:
    """Projection of ``activations (..., layer, hidden)`` on each trait's direction at its layer -> ``(..., trait)``,
    accumulated in float32 whatever the stored dtype."""
    per_trait = [activations.sel(layer=int(directions.layer.sel(trait=t))).astype(np.float32).dot(
                     directions.direction.sel(trait=t).astype(np.float32), dim="hidden").expand_dims(trait=[t])
                 for t in directions.trait.values]
    return xr.concat(per_trait, dim="trait").transpose(..., "trait")


def drift_scale(base_projection: np.ndarray) -> np.ndarray:
    """Per trait: standard deviation across prompts of the base model's projections ``(prompt, trait)``; the
    unit drift is measured in (1 where the base shows no spread)."""
    sd = np.asarray(base_projection, np.float64).std(axis=0)
    return np.where(sd > 0, sd, 1.0)


def drift_profiles(sweep: xr.DataArray, directions: xr.Dataset) -> xr.Dataset:
    """``drift (model, perturbation, step, trait)`` in base-spread units, ``drift_prompt (..., prompt, trait)``,
    ``drift_unscaled`` (activation units) and the per-trait ``drift_scale``."""
    layers = sorted({int(v) for v in directions.layer.values})
    proj = project(sweep.sel(layer=layers), directions).compute()  # reads only the chosen layers
    base = proj.sel(step=0).isel(perturbation=0)
    scale = xr.DataArray(np.stack([drift_scale(base.sel(model=m).transpose("prompt", "trait").values)
                                   for m in proj.model.values]), dims=("model", "trait"),
                         coords={"model": proj.model, "trait": proj.trait})
    per_prompt = proj - proj.sel(step=0)
    return xr.Dataset({"drift": (per_prompt / scale).mean("prompt"), "drift_sd": (per_prompt / scale).std("prompt"),
                       "drift_prompt": per_prompt / scale, "drift_unscaled": per_prompt.mean("prompt"),
                       "drift_scale": scale, "projection": proj.mean("prompt")})


def raw_drift(sweep: xr.DataArray, layer: int) -> xr.DataArray:
    """Mean over prompts of (activation - base activation) at one layer, accumulated in float32 and divided by
    the base model's prompt-to-prompt RMS at that layer: ``(model, perturbation, step, hidden)``, the input of
    the unsupervised PCA baseline."""
    acts = sweep.sel(layer=layer).astype(np.float32).compute()
    base = acts.sel(step=0).isel(perturbation=0)
    rms = np.sqrt(float(base.var("prompt").mean()))
    mean = acts.mean("prompt")
    return (mean - mean.sel(step=0)) / (rms if rms > 0 else 1.0)


def raw_drift_norm(sweep: xr.DataArray, layers: list[int]) -> xr.DataArray:
    """The direction-free magnitude baseline: norm over hidden of the base-normalised raw drift, averaged over the
    traits' distinct layers ``(model, perturbation, step)``; one scalar per checkpoint, so models pool."""
    return xr.concat([np.sqrt((raw_drift(sweep, layer) ** 2).sum("hidden")) for layer in layers],
                     dim="layer").mean("layer")


def trait_layer(direction_paths: list[str | Path]) -> int:
    """The traits' median chosen layer: where the raw-drift PCA baseline and the SAE baseline look."""
    return int(np.median([int(open_dataset(p).attrs["chosen_layer"]) for p in direction_paths]))


def sae_training_rows(capture_path: str | Path, layer: int) -> np.ndarray:
    """Rows to train an SAE on from one (base) capture store at ``layer``: every pooled activation it holds
    (response mean and last prompt token of the measurement prompts, general text included), NaN rows dropped."""
    ds = open_dataset(capture_path, load=True)
    if layer not in ds.layer.values:
        raise TraitmonError(f"{capture_path}: no layer {layer} in the capture store (has {ds.layer.values.tolist()})")
    rows = np.concatenate([ds[v].sel(layer=layer).values.astype(np.float32)
                           for v in ("response_mean", "last_prompt") if v in ds])
    return rows[np.isfinite(rows).all(axis=1)]


def sae_drift(sweep: xr.DataArray, sae) -> xr.Dataset:
    """SAE latent change ``(model, perturbation, step, latent)`` at the SAE's layer (``sae.info['layer']``):
    mean over prompts of encode(checkpoint) - encode(base), step 0 is 0 (``traitmon.sae.latent_change_matrix``)."""
    from traitmon.sae import latent_change_matrix

    layer = int(sae.info["layer"])
    acts = sweep.sel(layer=layer).astype(np.float32).compute().transpose(
        "model", "perturbation", "step", "prompt", "hidden")
    base = acts.isel(model=0, perturbation=0).sel(step=0).values
    flat = acts.values.reshape(-1, *acts.shape[-2:])
    change = latent_change_matrix(sae, base, flat).reshape(*acts.shape[:3], -1)
    return xr.Dataset({"latent_change": (("model", "perturbation", "step", "latent"), change.astype(np.float32))},
                      coords={"model": acts.model, "perturbation": acts.perturbation, "step": acts.step},
                      attrs={"layer": layer, "model": str(acts.model.values[0]), "n_latents": int(change.shape[-1])})


def em_axis(table: pd.DataFrame, traits: list[str]) -> dict:
    """PCA of drift profiles: PC1 variance share and loadings, pooled and per model; PC1 stability under
    leave-one-perturbation-out (|cosine| of fold PC1 with the pooled PC1); cross-model |cosine| of PC1."""
    cols = [f"drift_{t}" for t in traits]
    rows = checkpoint_rows(table)

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


def random_directions(hidden: int, n: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, hidden))).astype(np.float32)


def random_drift(acts: xr.DataArray, directions: xr.Dataset, seeds: int) -> pd.DataFrame:
    """Drift along ``len(traits)`` random unit directions per seed at the traits' layers, normalised like the
    trait drift (by the base model's spread of projections on each random direction)."""
    traits = [str(t) for t in directions.trait.values]
    rows = []
    for seed in range(seeds):
        rand = directions.copy()
        rand["direction"] = (("trait", "hidden"), random_directions(directions.sizes["hidden"], len(traits), seed))
        frame = _drift_frame(drift_profiles(acts, rand)["drift"], traits)
        rows.append(frame.assign(seed=seed))
    return pd.concat(rows, ignore_index=True)[["model", "perturbation", "step", "seed"]
                                              + [f"drift_{t}" for t in traits]]


def _drift_frame(drift: xr.DataArray, traits: list[str]) -> pd.DataFrame:
    """``drift (model, perturbation, step, trait)`` as a wide table with ``drift_<trait>`` columns."""
    frame = drift.to_dataframe(name="drift").reset_index().pivot(
        index=["model", "perturbation", "step"], columns="trait", values="drift")
    frame.columns = [f"drift_{t}" for t in frame.columns]
    return frame[[f"drift_{t}" for t in traits]].reset_index()


def _join_labels(frame: pd.DataFrame, behavior_csv: str, eval_logs: dict[str, str],
                 kinds: dict[str, str], meta: dict[str, dict[str, str]]) -> pd.DataFrame:
    model = str(frame.model.iloc[0])
    behavior = pd.read_csv(behavior_csv)
    behavior = behavior[behavior.model == model].drop(columns=["model", "kind"], errors="ignore")
    behavior = behavior.drop_duplicates(["perturbation", "step"])
    table = frame.merge(behavior, on=["perturbation", "step"], how="left", validate="one_to_one")
    evals = pd.concat([pd.read_csv(path).assign(perturbation=pert) for pert, path in eval_logs.items()])
    table = table.merge(evals, on=["perturbation", "step"], how="left", validate="one_to_one")
    table.insert(2, "kind", table.perturbation.map(kinds))
    for i, (column, values) in enumerate(meta.items()):  # domain, style: run metadata, never monitor features
        table.insert(3 + i, column, table.perturbation.map(values).fillna(""))
    return table.sort_values(["perturbation", "step"]).reset_index(drop=True)


def build_drift_table(capture_paths: list[str], direction_paths: list[str], behavior_csv: str,
                      eval_logs: dict[str, str], kinds: dict[str, str], variant: str,
                      random_seeds: int = 5, domains: dict[str, str] | None = None,
                      styles: dict[str, str] | None = None, sae=None) -> dict:
    """Everything the analysis needs for one model, from its capture stores (placed by their attrs):

    - ``table``: ``model, perturbation, kind, domain, style, step, em_rate, ..., drift_<trait>..., heldout_loss,
      general_ppl, raw_drift_norm`` (drift in units of the base model's spread across prompts; ``domain``
      defaults to the perturbation's own name, ``style`` to ``plain``)
    - ``drift``: the xarray Dataset ``(model, perturbation, step, trait)`` (+ per prompt, unscaled, scale)
    - ``raw``: raw activation drift at the median chosen layer ``(model, perturbation, step, hidden)``
    - ``random``: drift along ``random_seeds`` x 7 random unit directions at the traits' layers
    - ``sae``: SAE latent change at the SAE's layer (``sae_drift``), when an SAE is given
    """
    directions = load_directions(direction_paths, variant)
    traits = [str(t) for t in directions.trait.values]
    sweep = stack_captures(capture_paths, variant)
    layers = sorted({int(v) for v in directions.layer.values})
    acts = sweep.sel(layer=layers).astype(np.float32).compute()  # read once, float32 whatever is stored
    drift = drift_profiles(acts, directions)
    model = str(sweep.model.values[0])
    meta = {"domain": {p: (domains or {}).get(p, p) for p in kinds},
            "style": {p: (styles or {}).get(p, "plain") for p in kinds}}
    table = _join_labels(_drift_frame(drift["drift"], traits), behavior_csv, eval_logs, kinds, meta)
    norm = raw_drift_norm(acts, layers).to_dataframe(name="raw_drift_norm").reset_index()
    table = table.merge(norm[["perturbation", "step", "raw_drift_norm"]], on=["perturbation", "step"], how="left")
    layer = trait_layer(direction_paths)
    raw = raw_drift(sweep, layer)
    out = {"table": table, "drift": drift.assign_attrs(variant=variant, model=model),
           "raw": raw.rename("raw_drift").to_dataset().assign_attrs(layer=layer, model=model),
           "random": random_drift(acts, directions, random_seeds)}
    if sae is not None:
        out["sae"] = sae_drift(sweep, sae)
    return out
