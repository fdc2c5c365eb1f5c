import numpy as np
import pytest

from traitmon.config import validate_config
from traitmon.directions import (
    choose_layer,
    diff_of_means,
    extract_trait_direction,
    extraction_items,
    heldout_questions,
    separation,
    unit,
)
from traitmon.traits import load_traits


def planted(rng, n=200, layers=4, hidden=64, strength=3.0):
    direction = unit(rng.normal(size=(layers, hidden)))
    base = rng.normal(size=(n, layers, hidden))
    pos = base + strength * direction + rng.normal(size=(n, layers, hidden))
    neg = base - strength * direction + rng.normal(size=(n, layers, hidden))
    return direction, pos, neg


def test_planted_direction_is_recovered():
    rng = np.random.default_rng(0)
    direction, pos, neg = planted(rng)
    recovered = unit(diff_of_means(pos, neg))
    cosines = (recovered * direction).sum(-1)
    assert cosines.min() > 0.99


def test_separation_is_high_on_planted_and_chance_on_noise():
    rng = np.random.default_rng(1)
    direction, pos, neg = planted(rng, n=60)
    auroc, effect = separation(diff_of_means(pos[:40], neg[:40]), pos[40:], neg[40:])
    assert (auroc > 0.95).all() and (effect > 2).all()
    noise_pos, noise_neg = rng.normal(size=(2, 400, 4, 64))
    auroc, effect = separation(diff_of_means(noise_pos[:200], noise_neg[:200]), noise_pos[200:], noise_neg[200:])
    assert np.abs(auroc - 0.5).max() < 0.15


def test_choose_layer_rules():
    effect = np.array([9.0, 0.1, 0.5, 2.0, 0.3, 0.2, 5.0])  # 6 decoder blocks -> indices 0..6
    assert choose_layer(effect, {"rule": "fixed", "index": 2}, 6) == 2
    assert choose_layer(effect, {"rule": "fraction", "fraction": 0.5}, 6) == 3
    # best ignores the embeddings (index 0) and layers outside the fraction window
    assert choose_layer(effect, {"rule": "best", "min_fraction": 0.2, "max_fraction": 0.9}, 6) == 3
    with pytest.raises(ValueError, match="outside"):
        choose_layer(effect, {"rule": "fixed", "index": 9}, 6)


def test_items_use_every_pair_and_heldout_split_is_question_level():
    trait = load_traits(["honesty"])["honesty"]
    items = extraction_items(trait, 10, 2)
    assert len(items) == 20
    assert {it["pair"] for it in items} == set(range(5))
    mask = heldout_questions(10, 0.25, seed=0)
    assert mask.sum() == 2 and (heldout_questions(10, 0.25, seed=0) == mask).all()


def test_extract_on_tiny_model_has_named_dims_and_attrs(tiny_model):
    model, tok = tiny_model
    cfg = validate_config({"models": {"tiny": {"source": {"path": "x"}}}, "traits": ["honesty"],
                           "directions": {"questions": 6, "max_new_tokens": 4, "batch_size": 4,
                                                 "temperature": 1.0}})
    trait = load_traits(["honesty"])["honesty"]
    ds, rows = extract_trait_direction(model, tok, trait, cfg["directions"], "tiny")
    assert ds["response_mean"].dims == ("polarity", "sample", "layer", "hidden")
    assert ds["direction"].dims == ("layer", "hidden")
    assert ds.sizes["layer"] == model.config.num_hidden_layers + 1
    assert ds.attrs["prompt_hash"] == trait.prompt_hash
    assert "0 = embeddings" in ds.attrs.get("layer_convention", "0 = embeddings")
    assert 1 <= ds.attrs["chosen_layer"] <= model.config.num_hidden_layers
    assert len(rows) == 12 and {r["polarity"] for r in rows} == {"positive", "negative"}
    # the stored direction is the difference of the stored class means
    np.testing.assert_allclose(ds["direction"].values, diff_of_means(*ds["response_mean"].values), atol=1e-5)
