import numpy as np
import pytest

from traitmon.config import validate_config
from traitmon.directions import (
    choose_layer,
    diff_of_means,
    direction_variables,
    extract_trait_direction,
    extraction_items,
    heldout_questions,
    question_splits,
    separation,
    unit,
)
from traitmon.errors import TraitmonError
from traitmon.settings import study_settings
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
    _, pos, neg = planted(rng, n=60)
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
    ds, rows = extract_trait_direction(model, tok, trait, study_settings(cfg).directions, "tiny")
    assert ds["response_mean"].dims == ("polarity", "sample", "layer", "hidden")
    assert ds["direction"].dims == ("layer", "hidden")
    assert ds.sizes["layer"] == model.config.num_hidden_layers + 1
    assert ds.attrs["prompt_hash"] == trait.prompt_hash
    # three question-level splits: the layer is chosen on 'selection', separation reported on 'heldout'
    splits = ds.split.to_series()
    assert set(splits) == {"train", "selection", "heldout"}
    questions = ds.question.to_series()
    assert not set(questions[splits == "selection"]) & set(questions[splits == "heldout"])
    assert model.config.num_hidden_layers == 3  # the best rule's 0.2-0.9 window is then layers 1..2
    window = ds.selection_effect_size.sel(layer=slice(1, 2)).values
    assert ds.attrs["chosen_layer"] == 1 + int(np.nanargmax(window))
    assert ds.attrs["dropped_pairs_heldout"] >= 0
    assert "0 = embeddings" in ds.attrs.get("layer_convention", "0 = embeddings")
    assert 1 <= ds.attrs["chosen_layer"] <= model.config.num_hidden_layers
    assert len(rows) == 12 and {r["polarity"] for r in rows} == {"positive", "negative"}
    # the stored direction is the difference of the stored class means
    np.testing.assert_allclose(ds["direction"].values, diff_of_means(*ds["response_mean"].values), atol=1e-5)


def noise_activations(rng, n_samples, layers, hidden=16):
    pos, neg = rng.normal(size=(2, n_samples, layers, hidden))
    return {"response_mean": np.stack([pos, neg]), "last_prompt": np.stack([pos, neg])}


def test_layer_choice_does_not_inflate_the_reported_separation():
    """Pure noise over 21 layers: the held-out effect at the chosen layer must be unbiased (about 0). Choosing
    and reporting on the same questions, as before, reports the maximum of 21 noisy effects instead."""
    rule, n_layers, n_questions = {"rule": "best", "min_fraction": 0.0, "max_fraction": 1.0}, 20, 24
    split = question_splits(n_questions, 0.25, seed=0)
    reported, same_questions = [], []
    for seed in range(150):
        acts = noise_activations(np.random.default_rng(seed), n_questions, n_layers + 1)
        data, chosen, dropped = direction_variables(acts, split, rule, n_layers)
        effect = data["effect_size"][1]
        reported.append(effect[chosen])
        same_questions.append(effect[1:].max())  # the old rule: argmax of the reported effect itself
        assert dropped == {"selection": 0, "heldout": 0}
    assert abs(np.mean(reported)) < 0.15
    assert np.mean(same_questions) > 0.5  # what the old rule reported on the same noise


def test_question_splits_are_disjoint_and_need_enough_questions():
    split = question_splits(8, 0.25, seed=3)
    assert (split == "heldout").sum() == 2 and (split == "selection").sum() == 2 and (split == "train").sum() == 4
    assert ((split == "heldout") == heldout_questions(8, 0.25, seed=3)).all()  # the held-out draw is unchanged
    assert set(question_splits(8, 0.25, seed=3, selection=False)) == {"train", "heldout"}
    with pytest.raises(TraitmonError, match="directions.questions=2"):
        question_splits(2, 0.25, seed=0)


def test_an_empty_response_is_dropped_not_allowed_to_make_every_layer_nan():
    rng = np.random.default_rng(4)
    _, pos, neg = planted(rng, n=60)
    pos[45] = np.nan  # a held-out pair whose positive response had no token
    auroc, effect = separation(diff_of_means(pos[:40], neg[:40]), pos[40:], neg[40:])
    expected = separation(diff_of_means(pos[:40], neg[:40]), np.delete(pos[40:], 5, 0), np.delete(neg[40:], 5, 0))
    assert np.isfinite(effect).all() and (effect > 2).all()
    np.testing.assert_allclose(auroc, expected[0])
    np.testing.assert_allclose(effect, expected[1])


def test_nan_pairs_are_counted_and_the_layer_choice_is_nan_safe():
    effect = np.array([9.0, 0.1, 0.5, 2.0, np.nan, 0.2, 5.0])
    assert choose_layer(effect, {"rule": "best", "min_fraction": 0.2, "max_fraction": 0.9}, 6) == 3
    with pytest.raises(TraitmonError, match="no layer in 2..5 has a finite effect size"):
        choose_layer(np.full(7, np.nan), {"rule": "best"}, 6)
    rng = np.random.default_rng(5)
    acts = noise_activations(rng, 12, 7)
    split = question_splits(12, 0.25, seed=0)
    first_selection = int(np.flatnonzero(split == "selection")[0])
    acts["response_mean"][1, first_selection] = np.nan
    _, chosen, dropped = direction_variables(acts, split, {"rule": "best"}, 6)
    assert dropped == {"selection": 1, "heldout": 0}
    assert 2 <= chosen <= 5
