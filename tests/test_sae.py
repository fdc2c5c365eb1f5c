"""TopK SAE: reconstructs held-out activations, is deterministic, saves without pickle, gives latent-change features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from traitmon.errors import TraitmonError
from traitmon.sae import (
    TopKSAE,
    TopVarianceLatents,
    fit_topk_sae,
    fraction_variance_explained,
    latent_change,
    latent_change_matrix,
)


def sparse_data(n: int, hidden: int = 48, n_atoms: int = 96, active: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    atoms = np.random.default_rng(123).normal(size=(n_atoms, hidden))
    codes = np.zeros((n, n_atoms))
    for row in codes:
        row[rng.choice(n_atoms, active, replace=False)] = rng.exponential(2.0, active)
    return (codes @ atoms + 0.05 * rng.normal(size=(n, hidden)) + 3.0).astype(np.float32)


@pytest.fixture()
def tiny_activations(tiny_model):
    """Hidden states of the tiny random Llama (conftest) on random token sequences: (tokens, hidden) at layer 2."""
    model, _ = tiny_model
    ids = torch.randint(5, model.config.vocab_size, (48, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    return hs.reshape(-1, hs.shape[-1]).numpy()


def test_reconstructs_heldout_tiny_model_activations_better_than_mean(tiny_activations):
    train, held = tiny_activations[:900], tiny_activations[900:]
    sae = fit_topk_sae(train, n_latents=128, k=8, steps=400, seed=0)
    assert fraction_variance_explained(sae, held) > 0.5
    assert (np.count_nonzero(sae.encode(held), axis=1) <= 8).all()


def test_recovers_synthetic_sparse_structure_and_beats_fewer_latents():
    x = sparse_data(3000)
    sae = fit_topk_sae(x[:2500], n_latents=192, k=8, steps=400, seed=0)
    fve = fraction_variance_explained(sae, x[2500:])
    assert fve > 0.5
    # a k=1 SAE cannot represent 4-atom mixtures: the measure can fail
    assert fraction_variance_explained(fit_topk_sae(x[:2500], n_latents=192, k=1, steps=400, seed=0), x[2500:]) < fve


def test_same_seed_same_weights_and_save_load_round_trip(tmp_path):
    x = sparse_data(400)
    a = fit_topk_sae(x, n_latents=32, k=4, steps=50, seed=3)
    b = fit_topk_sae(x, n_latents=32, k=4, steps=50, seed=3)
    c = fit_topk_sae(x, n_latents=32, k=4, steps=50, seed=4)
    assert all(np.array_equal(getattr(a, t), getattr(b, t)) for t in ("w_enc", "b_enc", "w_dec", "b_dec"))
    assert not np.array_equal(a.w_enc, c.w_enc)
    path = tmp_path / "sae" / "layer5.safetensors"
    a.save(path)
    assert path.with_suffix(".json").is_file()
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle
    loaded = TopKSAE.load(path)
    np.testing.assert_array_equal(loaded.encode(x[:10]), a.encode(x[:10]))
    assert loaded.k == 4 and loaded.info["seed"] == 3
    path.with_suffix(".json").unlink()
    with pytest.raises(TraitmonError, match="layer5.json"):
        TopKSAE.load(path)


def test_bad_inputs_give_one_line_errors():
    with pytest.raises(TraitmonError, match="k=40"):
        fit_topk_sae(sparse_data(20), n_latents=32, k=40)
    with pytest.raises(TraitmonError, match="shape"):
        fit_topk_sae(np.zeros(10))


def test_latent_change_features_and_in_fold_top_variance_reduction():
    x = sparse_data(600)
    sae = fit_topk_sae(x, n_latents=64, k=8, steps=200, seed=0)
    base = x[:32]
    assert np.allclose(latent_change(sae, base, base), 0)
    direction = sae.w_dec[5] * sae.scale  # moving along a decoder row raises that latent
    shifted = latent_change(sae, base, base + 2.0 * direction)
    assert shifted.shape == (64,) and shifted[5] > 0 and int(np.argmax(shifted)) == 5
    with pytest.raises(TraitmonError, match="shape"):
        latent_change(sae, base, base[:5])
    stacked = latent_change_matrix(sae, base, np.stack([base, base + 2.0 * direction]))
    np.testing.assert_allclose(stacked, np.stack([np.zeros(64), shifted]), atol=1e-5)
    with pytest.raises(TraitmonError, match="do not stack"):
        latent_change_matrix(sae, base, base)
    # the reducer keeps the 7 highest-variance columns, chosen on the rows it was fitted on only
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 64)) * 0.01
    feats[:, [3, 9, 11, 20, 30, 40, 63]] *= 100
    red = TopVarianceLatents(7).fit(feats[:15])
    assert red.latents_.tolist() == [3, 9, 11, 20, 30, 40, 63]
    assert red.transform(feats[15:]).shape == (5, 7)
