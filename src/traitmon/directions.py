"""Trait directions: difference of class means of response-token activations under contrastive prompts.

Per trait, each extraction question is asked under the positive and the negative system prompt of one or
more prompt pairs; the model's own responses are then teacher-forced and pooled per layer
(``traitmon.capture``). The direction at layer l is mean(positive) - mean(negative); the stored
``direction`` uses all questions.

Questions are split three ways so that the reported separation is not inflated by the layer choice: the
``train`` questions give a direction, the ``selection`` questions score it per layer and the ``best`` layer
rule picks the layer there (``selection_effect_size``); the ``heldout`` questions, used for nothing else, give
the reported separation (paired AUROC and effect size) of the direction from the train and selection
questions. Pairs with a NaN projection (an empty response has no response mean) are dropped and counted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

import traitmon
from traitmon.capture import capture
from traitmon.errors import TraitmonError
from traitmon.generate import generate_responses
from traitmon.hooks import num_layers
from traitmon.io import stable_hash
from traitmon.settings import DirectionSettings, as_dict
from traitmon.traits import Trait

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
POLARITIES = ("positive", "negative")
SPLITS = ("train", "selection", "heldout")


def extraction_items(trait: Trait, n_questions: int, pairs_per_question: int) -> list[dict]:
    """One item per (question, pair): question q uses pairs q, q+1, ... (mod n), so all pairs get used."""
    items = []
    for q, question in enumerate(trait.extraction_questions[:n_questions]):
        for k in range(pairs_per_question):
            pair_index = (q + k) % len(trait.pairs)
            items.append({"sample": len(items), "question_index": q, "question": question, "pair": pair_index})
    return items


def heldout_questions(n_questions: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over questions: True = held out (at least one question on each side)."""
    rng = np.random.default_rng(seed)
    n_held = min(max(1, round(n_questions * fraction)), n_questions - 1)
    mask = np.zeros(n_questions, dtype=bool)
    mask[rng.choice(n_questions, n_held, replace=False)] = True
    return mask


def question_splits(n_questions: int, fraction: float, seed: int, selection: bool = True) -> np.ndarray:
    """Per question, its split: ``heldout`` as ``heldout_questions`` draws it; with ``selection``, as many
    of the rest (at least one, leaving one to train on) become ``selection``; the others ``train``."""
    held = heldout_questions(n_questions, fraction, seed)
    splits = np.where(held, "heldout", "train").astype(object)
    if selection:
        rest = np.flatnonzero(~held)
        if len(rest) < 2:
            raise TraitmonError(f"directions.questions={n_questions} leaves {len(rest)} question(s) besides the "
                                "held-out ones; the 'best' layer rule needs 2 (one to train, one to select)")
        rng = np.random.default_rng([seed, 1])
        splits[rng.choice(rest, min(int(held.sum()), len(rest) - 1), replace=False)] = "selection"
    return splits.astype(str)


def diff_of_means(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """``[sample, layer, hidden]`` x2 -> ``[layer, hidden]``."""
    return np.nanmean(positive, axis=0) - np.nanmean(negative, axis=0)


def unit(vectors: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norm == 0, 1, norm)


def nan_pairs(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """``[sample]`` mask of pairs with a NaN anywhere (a response with no token has no response mean)."""
    def any_nan(values: np.ndarray) -> np.ndarray:  # over every axis but the first; fine with 0 samples
        return np.isnan(values).any(axis=tuple(range(1, values.ndim)))

    return any_nan(positive) | any_nan(negative)


def separation(direction: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, on held-out pairs (the same question under the positive and the negative prompt):
    the paired AUROC, P(proj(positive) > proj(negative)), and the paired effect size mean(d) / sd(d)
    with d = proj(positive) - proj(negative). Pairing removes the between-question variance, which on
    small models dwarfs the trait signal. ``direction`` is ``[layer, hidden]``, activations
    ``[sample, layer, hidden]`` aligned by sample. Pairs with a NaN activation are left out (``nan_pairs``)."""
    u = unit(direction)
    diff = np.einsum("slh,lh->sl", positive, u) - np.einsum("slh,lh->sl", negative, u)
    diff = diff[~nan_pairs(positive, negative)]
    if len(diff) == 0:
        return np.full(u.shape[0], np.nan), np.full(u.shape[0], np.nan)
    auroc = (diff > 0).mean(0) + 0.5 * (diff == 0).mean(0)
    sd = diff.std(0, ddof=1) if len(diff) > 1 else np.full(diff.shape[1], np.inf)
    effect = diff.mean(0) / np.where(sd == 0, np.inf, sd)
    return auroc, effect


def choose_layer(effect: np.ndarray, rule: dict, n_layers: int) -> int:
    """Pick a hidden_states index by rule: ``fixed`` (index), ``fraction`` (of depth) or ``best``
    (largest effect size within [min_fraction, max_fraction] of depth; NaN layers are never chosen).
    ``effect`` must come from questions other than those the separation is reported on."""
    kind = rule.get("rule", "best")
    if kind == "fixed":
        index = int(rule["index"])
        if not 0 <= index <= n_layers:
            raise ValueError(f"directions.layer.index {index} is outside 0..{n_layers}")
        return index
    if kind == "fraction":
        return round(rule["fraction"] * n_layers)
    lo = max(1, int(np.ceil(rule.get("min_fraction", 0.2) * n_layers)))
    hi = max(lo, min(n_layers, int(np.floor(rule.get("max_fraction", 0.9) * n_layers))))
    candidates = np.arange(lo, hi + 1)
    scores = np.asarray(effect, dtype=float)[candidates]
    if np.isnan(scores).all():
        raise TraitmonError(f"no layer in {lo}..{hi} has a finite effect size to choose by (every selection pair "
                            "was dropped: empty responses?); raise directions.max_new_tokens or use a fixed layer")
    return int(candidates[np.nanargmax(scores)])


def direction_variables(acts: dict[str, np.ndarray], split: np.ndarray, rule: dict,
                        n_layers: int) -> tuple[dict, int, dict[str, int]]:
    """Directions, per-layer selection effect and held-out separation, and the chosen layer.

    ``acts`` maps a pooling to ``[polarity, sample, layer, hidden]``; ``split`` is each sample's split.
    The layer is chosen on the selection samples (response mean); the reported ``separation`` and
    ``effect_size`` come from the held-out samples only. Returns (variables, layer, NaN pairs dropped)."""
    train, select, held = (split == name for name in SPLITS)
    data = {}
    for key, suffix in (("response_mean", ""), ("last_prompt", "_last_prompt")):
        pos, neg = acts[key]
        data[f"direction{suffix}"] = (("layer", "hidden"), diff_of_means(pos, neg).astype(np.float32))
        if select.any():
            _, chooser = separation(diff_of_means(pos[train], neg[train]), pos[select], neg[select])
            data[f"selection_effect_size{suffix}"] = (("layer",), chooser.astype(np.float32))
        fitted = train | select  # the reported direction sees every question but the held-out ones
        auroc, effect = separation(diff_of_means(pos[fitted], neg[fitted]), pos[held], neg[held])
        data[f"separation{suffix}"] = (("layer",), auroc.astype(np.float32))
        data[f"effect_size{suffix}"] = (("layer",), effect.astype(np.float32))
        data[key] = (("polarity", "sample", "layer", "hidden"), acts[key].astype(np.float32))
    pos, neg = acts["response_mean"]
    dropped = {name: int(nan_pairs(pos[split == name], neg[split == name]).sum()) for name in ("selection", "heldout")}
    chooser = data["selection_effect_size"][1] if select.any() else np.full(n_layers + 1, np.nan)
    return data, choose_layer(chooser, rule, n_layers), dropped


def extract_trait_direction(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, trait: Trait,
                            settings: DirectionSettings, model_key: str,
                            precision: str = "fp32") -> tuple[xr.Dataset, list[dict]]:
    """Generate contrastive responses, capture them, and build the direction Dataset.

    Returns ``(dataset, response_rows)``; ``settings`` is the config's ``directions`` section.
    """
    from traitmon.precision import for_model

    precision = for_model(precision, model, "directions")  # the store records what ran, never "auto"
    n_layers = num_layers(model)
    layers = list(range(n_layers + 1))
    items = extraction_items(trait, settings.questions, settings.pairs_per_question)
    chats = {pol: [[{"role": "system", "content": getattr(trait.pairs[it["pair"]], pol)},
                    {"role": "user", "content": it["question"]}] for it in items] for pol in POLARITIES}
    all_chats = chats["positive"] + chats["negative"]
    responses = generate_responses(model, tokenizer, all_chats, settings.max_new_tokens, settings.temperature,
                                   settings.batch_size, settings.seed, desc=f"{trait.name}: generate",
                                   precision=precision)
    pooled = capture(model, tokenizer, all_chats, responses, layers, settings.batch_size, precision=precision,
                     desc=f"{trait.name}: capture")
    n = len(items)
    for p, pol in enumerate(POLARITIES):
        if not any(responses[p * n:(p + 1) * n]):
            raise TraitmonError(f"trait '{trait.name}': the model gave no {pol} response with any token; raise "
                                "directions.max_new_tokens or use temperature > 0")
    acts = {key: np.stack([values[:n], values[n:]]) for key, values in pooled.items()}  # [polarity, sample, ...]

    n_questions = len({it["question_index"] for it in items})
    by_question = question_splits(n_questions, settings.heldout_fraction, settings.seed,
                                  selection=settings.layer["rule"] == "best")
    split = np.array([by_question[it["question_index"]] for it in items])
    data, chosen, dropped = direction_variables(acts, split, settings.layer, n_layers)
    if any(dropped.values()):
        log.warning("trait '%s': NaN pairs dropped (empty responses): %s", trait.name, dropped)
    ds = xr.Dataset(
        data,
        coords={"polarity": list(POLARITIES), "sample": np.arange(n), "layer": layers,
                "question": ("sample", [it["question"] for it in items]),
                "pair": ("sample", [it["pair"] for it in items]),
                "split": ("sample", split.tolist())},
        attrs={"model": model_key, "trait": trait.name, "prompt_hash": trait.prompt_hash,
               "settings_hash": stable_hash(as_dict(settings)), "chosen_layer": chosen,
               "dropped_pairs_selection": dropped["selection"], "dropped_pairs_heldout": dropped["heldout"],
               "layer_rule": stable_hash(settings.layer), "layer_rule_json": str(settings.layer),
               "num_layers": n_layers, "model_dtype": str(next(model.parameters()).dtype), "precision": precision,
               "stored_dtype": "float32", "traitmon_version": traitmon.__version__,
               "pooling": "response_mean: mean over response tokens; last_prompt: last token of the prompt"},
    )
    rows = [{"trait": trait.name, "polarity": pol, "sample": it["sample"], "pair": it["pair"],
             "split": str(split[it["sample"]]),
             "system": chats[pol][it["sample"]][0]["content"], "question": it["question"],
             "response": responses[p * n + it["sample"]]}
            for p, pol in enumerate(POLARITIES) for it in items]
    return ds, rows


def unit_direction(ds: xr.Dataset, layer: int | None = None, variant: str = "direction") -> np.ndarray:
    """Unit vector of a stored direction at ``layer`` (default: the chosen layer)."""
    layer = int(ds.attrs["chosen_layer"]) if layer is None else layer
    return unit(ds[variant].sel(layer=layer).values.astype(np.float32))


def cosine_matrix(directions: dict[str, np.ndarray]) -> np.ndarray:
    names = list(directions)
    u = unit(np.stack([directions[n] for n in names]))
    return u @ u.T
