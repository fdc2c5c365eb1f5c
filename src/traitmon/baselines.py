"""Baselines, evaluated with the same LOPO folds, calibration and metrics as the trait monitor:

- ``pca7``: unsupervised PCA (7 components) of raw activation drift at the traits' median layer (after Soligo
  et al.): per model (hidden sizes differ) on centred, unscaled drift normalised by the base model's activation
  RMS, fitted in-fold on the training perturbations only, deterministic (full SVD); the 7 component scores of
  all models are then pooled into one regressor, as the monitor pools the trait drift of all models;
- ``loss_ppl``: change in held-out loss and general-text perplexity since step 0;
- ``random7``: drift along 7 random unit directions at the traits' layers, one evaluation per seed: the floor.

An SAE-latent baseline is not built yet.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from traitmon.monitor import CappedPCA, candidates, checkpoint_rows, evaluate_lopo, rates

KEYS = ["model", "perturbation", "step"]


def loss_ppl_features(table: pd.DataFrame) -> pd.DataFrame:
    """Held-out loss and perplexity minus their step-0 values of the same perturbation (its own held-out set)."""
    out = table.copy()
    for col in ("heldout_loss", "general_ppl"):
        base = out[out.step == 0].drop_duplicates(["model", "perturbation"]).set_index(["model", "perturbation"])[col]
        out[f"{col}_delta"] = out[col].to_numpy() - base.reindex(list(zip(out.model, out.perturbation))).to_numpy()
    return out


def pca_fold_features(rows: pd.DataFrame, raw: dict[str, np.ndarray], n_components: int = 7):
    """``fold_features`` for ``evaluate_lopo``: per model, PCA fitted on that model's training rows only, the
    component scores of all its rows; columns padded to ``n_components`` when a model has fewer."""
    models = rows.model.to_numpy()

    def features(train: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), n_components))
        for model, x in raw.items():
            mine = models == model
            pca = CappedPCA(n_components).fit(x[train[mine]])
            scores = pca.transform(x)
            out[mine, :scores.shape[1]] = scores
        return out

    return features


def pca_baseline(table: pd.DataFrame, raw: dict[str, np.ndarray], theta: float, target_fnr: float,
                 n_components: int = 7) -> pd.DataFrame:
    """``raw[model]`` has one raw drift vector per checkpoint row of ``table[table.model == model]`` (same order)."""
    rows = checkpoint_rows(table)
    _, preds = evaluate_lopo(rows, [], theta, target_fnr, grid=candidates(), x=np.zeros((len(rows), 0)),
                             fold_features=pca_fold_features(rows, raw, n_components))
    return preds


def random_tables_for(table: pd.DataFrame, random_tables: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """Each seed's random-direction drift joined to the table's labels (and EM intervals)."""
    labels = [c for c in ("em_rate", "em_rate_ci_low", "em_rate_ci_high") if c in table]
    return [table[KEYS + labels].merge(rand, on=KEYS) for rand in random_tables]


def run_baselines(table: pd.DataFrame, raw: dict[str, np.ndarray], random_tables: list[pd.DataFrame],
                  theta: float, target_fnr: float) -> dict[str, pd.DataFrame | list[pd.DataFrame]]:
    """Each method's LOPO predictions (random7: one per seed). ``table`` carries heldout_loss_delta and
    general_ppl_delta (``loss_ppl_features`` of the table with step 0)."""
    out: dict[str, pd.DataFrame | list[pd.DataFrame]] = {"pca7": pca_baseline(table, raw, theta, target_fnr)}
    _, out["loss_ppl"] = evaluate_lopo(table, ["heldout_loss_delta", "general_ppl_delta"], theta, target_fnr)
    out["random7"] = []
    for merged in random_tables_for(table, random_tables):
        cols = [c for c in merged.columns if c.startswith("drift_")]
        out["random7"].append(evaluate_lopo(merged, cols, theta, target_fnr)[1])
    return out


def seed_spread(preds: list[pd.DataFrame]) -> dict:
    """Mean and sd over random-direction seeds of AUROC, FNR, FPR."""
    frame = pd.DataFrame([rates(p) for p in preds])
    return {**{f"{m}_seed_mean": float(frame[m].mean()) for m in ("auroc", "fnr", "fpr")},
            **{f"{m}_seed_sd": float(frame[m].std()) for m in ("auroc", "fnr", "fpr")}, "n_seeds": len(preds)}
