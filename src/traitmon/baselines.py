"""Baselines, evaluated with the same LOPO folds, calibration and metrics as the trait monitor:

- ``pca7``: unsupervised PCA (7 components) of raw activation drift at the traits' median layer (after Soligo
  et al.): per model (hidden sizes differ) on centred, unscaled drift normalised by the base model's activation
  RMS, fitted in-fold on the training perturbations only, deterministic (full SVD); the 7 component scores of
  all models are then pooled into one regressor, as the monitor pools the trait drift of all models;
- ``loss_ppl``: change in held-out loss and general-text perplexity since step 0;
- ``random7``: drift along 7 random unit directions at the traits' layers, one evaluation per seed: the floor;
- ``raw_norm``: the norm of the base-normalised raw activation drift, averaged over the traits' layers (one
  scalar per checkpoint, ``raw_drift_norm`` of the drift table): how far the model moved, in no direction;
- ``trait_norm``: the norm of the 7-d trait drift profile: how far it moved within the trait subspace, in no
  particular trait direction. The trait monitor must beat both for the trait *basis* to matter;
- ``sae``: change in TopK SAE latent activations between checkpoint and base at the traits' median layer,
  reduced in-fold to the 7 latents of largest variance (``traitmon.sae.TopVarianceLatents``, chosen over PCA
  so each kept dimension stays one latent). traitmon trains its own SAE on the base model's capture (rule
  ``train_sae``); pretrained SAEs exist for some paper models (Gemma Scope for Gemma-2-9B, Llama Scope for
  Llama-3.1-8B), none for Mistral-7B-v0.3, Qwen2.5-7B or SmolLM2, and are not loaded yet.

Every baseline runs under the same hold-out grouping as the monitor (``group``: perturbation or domain).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from traitmon.monitor import CappedPCA, candidates, checkpoint_rows, evaluate_lopo, rates
from traitmon.sae import TopVarianceLatents

KEYS = ["model", "perturbation", "step"]
MAGNITUDE = {"raw_norm": ["raw_drift_norm"], "trait_norm": ["trait_drift_norm"]}


def magnitude_features(table: pd.DataFrame) -> pd.DataFrame:
    """Adds ``trait_drift_norm``, the Euclidean norm of the drift_* profile (``raw_drift_norm`` comes with the
    drift table)."""
    cols = [c for c in table.columns if c.startswith("drift_")]
    return table.assign(trait_drift_norm=np.sqrt((table[cols].to_numpy(float) ** 2).sum(axis=1)))


def loss_ppl_features(table: pd.DataFrame) -> pd.DataFrame:
    """Held-out loss and perplexity minus their step-0 values of the same perturbation (its own held-out set)."""
    out = table.copy()
    for col in ("heldout_loss", "general_ppl"):
        base = out[out.step == 0].drop_duplicates(["model", "perturbation"]).set_index(["model", "perturbation"])[col]
        out[f"{col}_delta"] = out[col].to_numpy() - base.reindex(list(zip(out.model, out.perturbation))).to_numpy()
    return out


def pca_fold_features(rows: pd.DataFrame, raw: dict[str, np.ndarray], n_components: int = 7, reducer=CappedPCA):
    """``fold_features`` for ``evaluate_lopo``: per model, ``reducer(n_components)`` (PCA, or the top-variance
    SAE latents) fitted on that model's training rows only, applied to all its rows; columns padded to
    ``n_components`` when a model has fewer."""
    models = rows.model.to_numpy()

    def features(train: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), n_components))
        for model, x in raw.items():
            mine = models == model
            scores = reducer(n_components).fit(x[train[mine]]).transform(x)
            out[mine, :scores.shape[1]] = scores
        return out

    return features


def pca_baseline(table: pd.DataFrame, raw: dict[str, np.ndarray], theta: float, target_fnr: float,
                 n_components: int = 7, reducer=CappedPCA, group: str = "perturbation") -> pd.DataFrame:
    """``raw[model]`` has one raw drift vector per checkpoint row of ``table[table.model == model]`` (same order)."""
    rows = checkpoint_rows(table)
    _, preds = evaluate_lopo(rows, [], theta, target_fnr, grid=candidates(), x=np.zeros((len(rows), 0)),
                             fold_features=pca_fold_features(rows, raw, n_components, reducer), group=group)
    return preds


def random_tables_for(table: pd.DataFrame, random_tables: list[pd.DataFrame],
                      group: str = "perturbation") -> list[pd.DataFrame]:
    """Each seed's random-direction drift joined to the table's labels (and EM intervals, hold-out group)."""
    labels = [c for c in ("em_rate", "em_rate_ci_low", "em_rate_ci_high", group) if c in table and c not in KEYS]
    return [table[KEYS + labels].merge(rand, on=KEYS) for rand in random_tables]


def run_baselines(table: pd.DataFrame, raw: dict[str, np.ndarray], random_tables: list[pd.DataFrame],
                  theta: float, target_fnr: float, sae: dict[str, np.ndarray] | None = None,
                  group: str = "perturbation") -> dict[str, pd.DataFrame | list[pd.DataFrame]]:
    """Each method's held-out predictions (random7: one per seed). ``table`` carries heldout_loss_delta and
    general_ppl_delta (``loss_ppl_features`` of the table with step 0), raw_drift_norm and trait_drift_norm
    (``magnitude_features``); ``sae[model]``: latent change per checkpoint row, like ``raw``."""
    out: dict[str, pd.DataFrame | list[pd.DataFrame]] = {
        "pca7": pca_baseline(table, raw, theta, target_fnr, group=group)}
    _, out["loss_ppl"] = evaluate_lopo(table, ["heldout_loss_delta", "general_ppl_delta"], theta, target_fnr,
                                       group=group)
    for name, cols in MAGNITUDE.items():
        if set(cols) <= set(table.columns):
            _, out[name] = evaluate_lopo(table, cols, theta, target_fnr, group=group)
    if sae:
        out["sae"] = pca_baseline(table, sae, theta, target_fnr, reducer=TopVarianceLatents, group=group)
    out["random7"] = []
    for merged in random_tables_for(table, random_tables, group):
        cols = [c for c in merged.columns if c.startswith("drift_")]
        out["random7"].append(evaluate_lopo(merged, cols, theta, target_fnr, group=group)[1])
    return out


def seed_spread(preds: list[pd.DataFrame]) -> dict:
    """Mean and sd over random-direction seeds of AUROC, FNR, FPR."""
    frame = pd.DataFrame([rates(p) for p in preds])
    return {**{f"{m}_seed_mean": float(frame[m].mean()) for m in ("auroc", "fnr", "fpr")},
            **{f"{m}_seed_sd": float(frame[m].std()) for m in ("auroc", "fnr", "fpr")}, "n_seeds": len(preds)}
