"""Trait directions: difference of class means of response-token activations under contrastive prompts.

Per trait, each extraction question is asked under the positive and the negative system prompt of one or
more prompt pairs; the model's own responses are then teacher-forced and pooled per layer
(``traitmon.capture``). The direction at layer l is mean(positive) - mean(negative). Questions are split
into a train part (direction for the separation measure) and a held-out part (separation: paired AUROC
and effect size of the projection); the stored ``direction`` uses all questions.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

import traitmon
from traitmon.capture import capture
from traitmon.errors import TraitmonError
from traitmon.generate import generate_responses
from traitmon.hooks import num_layers
from traitmon.io import stable_hash
from traitmon.traits import Trait

POLARITIES = ("positive", "negative")


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


def diff_of_means(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """``[sample, layer, hidden]`` x2 -> ``[layer, hidden]``."""
    return np.nanmean(positive, axis=0) - np.nanmean(negative, axis=0)


def unit(vectors: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norm == 0, 1, norm)


def separation(direction: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, on held-out pairs (the same question under the positive and the negative prompt):
    the paired AUROC, P(proj(positive) > proj(negative)), and the paired effect size mean(d) / sd(d)
    with d = proj(positive) - proj(negative). Pairing removes the between-question variance, which on
    small models dwarfs the trait signal. ``direction`` is ``[layer, hidden]``, activations
    ``[sample, layer, hidden]`` aligned by sample."""
    u = unit(direction)
    diff = np.einsum("slh,lh->sl", positive, u) - np.einsum("slh,lh->sl", negative, u)
    auroc = (diff > 0).mean(0) + 0.5 * (diff == 0).mean(0)
    sd = diff.std(0, ddof=1) if len(diff) > 1 else np.full(diff.shape[1], np.inf)
    effect = diff.mean(0) / np.where(sd == 0, np.inf, sd)
    return auroc, effect


def choose_layer(effect: np.ndarray, rule: dict, n_layers: int) -> int:
    """Pick a hidden_states index by rule: ``fixed`` (index), ``fraction`` (of depth) or ``best``
    (largest held-out effect size within [min_fraction, max_fraction] of depth)."""
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
    return int(candidates[np.argmax(effect[candidates])])


def extract_trait_direction(model, tokenizer, trait: Trait, settings: dict, model_key: str):
    """Generate contrastive responses, capture them, and build the direction Dataset.

    Returns ``(dataset, response_rows)``; ``settings`` is the config's ``directions`` section.
    """
    n_layers = num_layers(model)
    layers = list(range(n_layers + 1))
    items = extraction_items(trait, settings["questions"], settings["pairs_per_question"])
    chats = {pol: [[{"role": "system", "content": getattr(trait.pairs[it["pair"]], pol)},
                    {"role": "user", "content": it["question"]}] for it in items] for pol in POLARITIES}
    all_chats = chats["positive"] + chats["negative"]
    responses = generate_responses(model, tokenizer, all_chats, settings["max_new_tokens"], settings["temperature"],
                                   settings["batch_size"], settings["seed"], desc=f"{trait.name}: generate")
    pooled = capture(model, tokenizer, all_chats, responses, layers, settings["batch_size"],
                     desc=f"{trait.name}: capture")
    n = len(items)
    for p, pol in enumerate(POLARITIES):
        if not any(responses[p * n:(p + 1) * n]):
            raise TraitmonError(f"trait '{trait.name}': the model gave no {pol} response with any token; raise "
                                "directions.max_new_tokens or use temperature > 0")
    acts = {key: np.stack([values[:n], values[n:]]) for key, values in pooled.items()}  # [polarity, sample, ...]

    n_questions = len({it["question_index"] for it in items})
    held_q = heldout_questions(n_questions, settings["heldout_fraction"], settings["seed"])
    held = np.array([held_q[it["question_index"]] for it in items])
    data = {}
    for key, suffix in (("response_mean", ""), ("last_prompt", "_last_prompt")):
        pos, neg = acts[key]
        data[f"direction{suffix}"] = (("layer", "hidden"), diff_of_means(pos, neg).astype(np.float32))
        train_dir = diff_of_means(pos[~held], neg[~held])
        auroc, effect = separation(train_dir, pos[held], neg[held])
        data[f"separation{suffix}"] = (("layer",), auroc.astype(np.float32))
        data[f"effect_size{suffix}"] = (("layer",), effect.astype(np.float32))
        data[key] = (("polarity", "sample", "layer", "hidden"), acts[key].astype(np.float32))
    chosen = choose_layer(data["effect_size"][1], settings["layer"], n_layers)
    ds = xr.Dataset(
        data,
        coords={"polarity": list(POLARITIES), "sample": np.arange(n), "layer": layers,
                "question": ("sample", [it["question"] for it in items]),
                "pair": ("sample", [it["pair"] for it in items]),
                "split": ("sample", np.where(held, "heldout", "train").tolist())},
        attrs={"model": model_key, "trait": trait.name, "prompt_hash": trait.prompt_hash,
               "settings_hash": stable_hash(settings), "chosen_layer": chosen,
               "layer_rule": stable_hash(settings["layer"]), "layer_rule_json": str(settings["layer"]),
               "num_layers": n_layers, "model_dtype": str(next(model.parameters()).dtype),
               "stored_dtype": "float32", "traitmon_version": traitmon.__version__,
               "pooling": "response_mean: mean over response tokens; last_prompt: last token of the prompt"},
    )
    rows = [{"trait": trait.name, "polarity": pol, "sample": it["sample"], "pair": it["pair"],
             "split": "heldout" if held[it["sample"]] else "train",
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
