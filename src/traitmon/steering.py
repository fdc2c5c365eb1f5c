"""Steering check: add ``coef * direction`` at the chosen layer while generating, then read how far the
generated answers project on the direction (teacher-forced, unsteered). A direction that steers moves the
projection monotonically with ``coef``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import xarray as xr
from scipy.stats import spearmanr

from traitmon.capture import capture
from traitmon.directions import unit_direction
from traitmon.generate import generate_responses
from traitmon.hooks import add_to_layer
from traitmon.settings import SteeringSettings
from traitmon.traits import Trait

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def steering_check(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, direction: xr.Dataset, trait: Trait,
                   settings: SteeringSettings, seed: int, precision: str = "fp32") -> pd.DataFrame:
    """One row per (coef, question): the generated answer and its projection on the unit direction.

    ``coef`` is in units of the raw difference-of-means vector, so coef 1 shifts activations by the full
    positive-minus-negative gap measured at extraction.
    """
    from traitmon.precision import for_model

    precision = for_model(precision, model, "steering")
    layer = int(direction.attrs["chosen_layer"])
    raw = direction["direction"].sel(layer=layer).values.astype(np.float32)
    u = unit_direction(direction, layer)
    questions = list(trait.evaluation_questions[: settings.questions])
    chats = [[{"role": "user", "content": q}] for q in questions]
    rows = []
    for coef in settings.coefs:
        with add_to_layer(model, layer, torch.from_numpy(coef * raw)):
            answers = generate_responses(model, tokenizer, chats, settings.max_new_tokens, 0.0,
                                         settings.batch_size, seed, desc=f"{trait.name}: steer {coef:+g}",
                                         precision=precision)
        pooled = capture(model, tokenizer, chats, answers, [layer], settings.batch_size, desc="project",
                         precision=precision)
        projection = pooled["response_mean"][:, 0, :] @ u
        rows += [{"trait": trait.name, "layer": layer, "coef": coef, "question": q, "answer": a,
                  "projection": float(p)} for q, a, p in zip(questions, answers, projection)]
    return pd.DataFrame(rows)


def steering_response(table: pd.DataFrame) -> dict:
    """Slope of mean projection per unit coef, Spearman rho over coefs, and whether it is monotonic."""
    means = table.groupby("coef")["projection"].mean().sort_index()
    slope = float(np.polyfit(means.index.values, means.values, 1)[0])
    rho = float(spearmanr(means.index.values, means.values).statistic)
    diffs = np.diff(means.values)
    return {"steering_slope": slope, "steering_spearman": rho, "steering_monotonic": bool(np.all(diffs > 0)),
            "projection_at_min_coef": float(means.iloc[0]), "projection_at_max_coef": float(means.iloc[-1])}
