"""Baselines, evaluated with the same LOPO folds and metrics as the trait monitor:

- ``pca7``: unsupervised PCA (7 components, fitted in-fold) of raw activation drift at the traits' median layer
  (after Soligo et al.), per model;
- ``loss_ppl``: change in held-out loss and general-text perplexity since step 0;
- ``random7``: drift along 7 random unit directions at the traits' layers (mean and sd over seeds): the floor.

An SAE-latent baseline is not built yet.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from traitmon.monitor import candidates, evaluate_lopo, rates


def loss_ppl_features(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for col in ("heldout_loss", "general_ppl"):
        base = out[out.step == 0].set_index(["model", "perturbation"])[col]
        out[f"{col}_delta"] = out[col].to_numpy() - base.reindex(list(zip(out.model, out.perturbation))).to_numpy()
    return out


def pca_baseline(table: pd.DataFrame, raw: dict[str, np.ndarray], theta: float, target_fnr: float) -> pd.DataFrame:
    """``raw[model]`` has one raw drift vector per row of ``table[table.model == model]`` (same order)."""
    preds = []
    for model, sub in table.groupby("model", sort=False):
        x = raw[model]
        _, p = evaluate_lopo(sub, [], theta, target_fnr, grid=candidates(pca_components=7), x=x)
        preds.append(p)
    return pd.concat(preds)


def run_baselines(table: pd.DataFrame, raw: dict[str, np.ndarray], random_tables: list[pd.DataFrame],
                  theta: float, target_fnr: float) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Rows: method, auroc, fnr, fpr (+ sd over seeds for random7). Also returns each method's predictions."""
    rows, all_preds = [], {}
    preds = pca_baseline(table, raw, theta, target_fnr)
    all_preds["pca7"] = preds
    rows.append({"method": "pca7 (raw activation drift)", **rates(preds)})
    # ``table`` carries heldout_loss_delta / general_ppl_delta (``loss_ppl_features`` on the table with step 0)
    _, preds = evaluate_lopo(table, ["heldout_loss_delta", "general_ppl_delta"], theta, target_fnr)
    all_preds["loss_ppl"] = preds
    rows.append({"method": "loss + perplexity", **rates(preds)})
    per_seed = []
    for i, rand in enumerate(random_tables):
        merged = table[["model", "perturbation", "step", "em_rate"]].merge(rand, on=["model", "perturbation", "step"])
        cols = [c for c in rand.columns if c.startswith("drift_")]
        _, preds = evaluate_lopo(merged, cols, theta, target_fnr)
        if i == 0:
            all_preds["random7"] = preds
        per_seed.append(rates(preds))
    frame = pd.DataFrame(per_seed)
    rows.append({"method": f"random7 (mean of {len(per_seed)} seeds)", **frame.mean(numeric_only=True).to_dict(),
                 "auroc_sd": float(frame.auroc.std()), "fnr_sd": float(frame.fnr.std()), "fpr_sd": float(frame.fpr.std())})
    rows.append({"method": "sae latents", "note": "not built yet"})
    return pd.DataFrame(rows), all_preds
