"""Drift tables from capture stores: placed by attrs, matching directions, base-model normalisation."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from traitmon.cli import main
from traitmon.drift import build_drift_table, stack_captures
from traitmon.errors import TraitmonError
from traitmon.store import write_dataset

TRAITS = ["honesty", "sycophancy"]
HIDDEN, LAYERS, PROMPTS = 8, [0, 1, 2], 5
PERTS, STEPS = ["a", "b", "c"], [2, 4]


def _directions(folder):
    paths = []
    for i, trait in enumerate(TRAITS):
        resp = np.zeros((len(LAYERS), HIDDEN), np.float32)
        last = np.zeros((len(LAYERS), HIDDEN), np.float32)
        resp[:, i] = 1.0          # response-mean direction: axis i
        last[:, 4 + i] = 1.0      # last-prompt direction: axis 4 + i (orthogonal to every response direction)
        ds = xr.Dataset({"direction": (("layer", "hidden"), resp), "direction_last_prompt": (("layer", "hidden"), last)},
                        coords={"layer": LAYERS}, attrs={"trait": trait, "chosen_layer": 1, "model": "m"})
        paths.append(str(write_dataset(ds, folder / f"{trait}.zarr")))
    return paths


def _captures(folder, scale=1.0, seed=0):
    """Base activations with prompt spread; checkpoint c of perturbation p moves along axes 0 (response mean)
    and 5 (last prompt) by p_index * step."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (PROMPTS, len(LAYERS), HIDDEN))
    paths = []

    def store(name, acts, pert, step):
        ds = xr.Dataset({"response_mean": (("prompt", "layer", "hidden"), (acts * scale).astype(np.float32)),
                         "last_prompt": (("prompt", "layer", "hidden"), (acts[..., ::-1] * scale).astype(np.float32))},
                        coords={"layer": LAYERS}, attrs={"model": "m", "perturbation": pert, "step": step})
        paths.append(str(write_dataset(ds, folder / name)))

    store("zz-base.zarr", base, "", 0)
    for k, pert in enumerate(PERTS):
        for step in STEPS:
            acts = base.copy()
            acts[..., 0] += 0.1 * (k + 1) * step
            acts[..., 2] += 0.05 * (k + 1) * step  # reversed in last_prompt: hidden 5
            store(f"{step}-{pert}.zarr", acts, pert, step)
    return paths[::-1]  # order must not matter: stores are placed by their attrs


def _labels(folder):
    rows = [{"model": "m", "perturbation": p, "step": s, "kind": "em", "em_rate": 0.1 * k * s / 4,
             "em_rate_ci_low": 0.0, "em_rate_ci_high": 0.3} for k, p in enumerate(PERTS) for s in [0] + STEPS]
    pd.DataFrame(rows).to_csv(folder / "em_scores.csv", index=False)
    logs = {}
    for p in PERTS:
        pd.DataFrame({"step": [0] + STEPS, "heldout_loss": [2.0, 1.9, 1.8], "general_ppl": [9.0, 9.1, 9.3]}).to_csv(
            folder / f"{p}.csv", index=False)
        logs[p] = str(folder / f"{p}.csv")
    return str(folder / "em_scores.csv"), logs


@pytest.fixture
def study(tmp_path):
    return _directions(tmp_path / "dirs"), _captures(tmp_path / "cap"), *_labels(tmp_path)


def test_sweep_is_stacked_from_the_stores_attrs(study):
    _, captures, _, _ = study
    sweep = stack_captures(captures, "response_mean")
    assert list(sweep.perturbation.values) == PERTS and list(sweep.step.values) == [0] + STEPS
    moved = sweep.sel(model="m", layer=1, hidden=0).mean("prompt") - sweep.sel(model="m", layer=1, hidden=0,
                                                                              step=0).mean("prompt")
    np.testing.assert_allclose(moved.sel(perturbation="b", step=4), 0.1 * 2 * 4, rtol=1e-5)


def test_missing_checkpoint_store_is_named(study):
    _, captures, _, _ = study
    with pytest.raises(TraitmonError, match="no capture store"):
        stack_captures([p for p in captures if "4-b" not in p], "response_mean")


def test_stores_of_different_precisions_do_not_mix(study):
    from traitmon.store import open_dataset

    _, captures, _, _ = study
    ds = open_dataset(captures[0], load=True)
    ds.attrs["precision"] = "bf16"  # the others carry none: written in float32
    write_dataset(ds, captures[0])
    # a study continued on a machine that resolves auto differently: one line naming a store of each
    # precision, both precisions and the key that pins them
    with pytest.raises(TraitmonError, match=r"captured at fp32 but .*\.zarr at bf16 .*set capture\.precision") as err:
        stack_captures(captures, "response_mean")
    assert str(captures[0]) in str(err.value) and "\n" not in str(err.value)


def test_drift_is_in_units_of_the_base_models_spread(tmp_path, study):
    dirs, captures, behavior, logs = study
    kinds = dict.fromkeys(PERTS, "em")
    one = build_drift_table(captures, dirs, behavior, logs, kinds, "response_mean")["table"]
    big = build_drift_table(_captures(tmp_path / "big", scale=100.0), dirs, behavior, logs, kinds,
                            "response_mean")["table"]
    cols = [f"drift_{t}" for t in TRAITS]
    assert one[cols].abs().to_numpy().max() > 0.1
    np.testing.assert_allclose(big[cols].to_numpy(), one[cols].to_numpy(), rtol=1e-4, atol=1e-6)


def test_last_prompt_variant_projects_on_the_last_prompt_direction(study):
    dirs, captures, behavior, logs = study
    out = build_drift_table(captures, dirs, behavior, logs, dict.fromkeys(PERTS, "em"), variant="last_prompt")
    table = out["table"]
    # last_prompt activations move along hidden 5 (the sycophancy last-prompt direction), not along hidden 4
    assert table.drift_sycophancy[table.step == 4].abs().min() > 0.1
    np.testing.assert_allclose(table.drift_honesty, 0.0, atol=1e-5)


def test_drift_cli_takes_capture_paths_and_named_eval_logs(tmp_path, study):
    dirs, captures, behavior, logs = study
    out = tmp_path / "out"
    args = ["drift", "--captures", *captures, "--directions", *dirs, "--behavior", behavior,
            "--eval-logs", *[f"{p}={path}" for p, path in logs.items()], "--kinds", *[f"{p}:em" for p in PERTS],
            "--table", str(out / "drift.csv"), "--store", str(out / "d.zarr"), "--raw", str(out / "raw.zarr"),
            "--random", str(out / "random.csv")]
    assert main(args) == 0
    table = pd.read_csv(out / "drift.csv")
    assert len(table) == len(PERTS) * 3 and {"em_rate_ci_low", "heldout_loss", "kind"} <= set(table.columns)
    assert set(pd.read_csv(out / "random.csv").seed) == set(range(5))
    bad = args.copy()
    bad[bad.index("--eval-logs") + 1] = logs["a"]
    assert main(bad) == 2


def test_raw_drift_norm_is_base_normalised_and_runs_carry_domain_and_style(tmp_path, study):
    dirs, captures, behavior, logs = study
    kinds = dict.fromkeys(PERTS, "em")
    one = build_drift_table(captures, dirs, behavior, logs, kinds, "response_mean",
                            domains={"a": "medical", "b": "medical"}, styles={"c": "terse"})["table"]
    big = build_drift_table(_captures(tmp_path / "big", scale=100.0), dirs, behavior, logs, kinds,
                            "response_mean")["table"]
    np.testing.assert_allclose(big.raw_drift_norm, one.raw_drift_norm, rtol=1e-4, atol=1e-6)
    assert (one.raw_drift_norm[one.step == 0] == 0).all()
    # perturbation k moves hidden 0 by 0.1 (k + 1) step and hidden 2 by half that: the norm grows with both
    last = one[one.step == 4].set_index("perturbation").raw_drift_norm
    assert last["a"] < last["b"] < last["c"]
    np.testing.assert_allclose(last["c"] / last["a"], 3.0, rtol=1e-4)
    assert dict(zip(one.perturbation, one.domain)) == {"a": "medical", "b": "medical", "c": "c"}
    assert dict(zip(one.perturbation, one["style"])) == {"a": "plain", "b": "plain", "c": "terse"}


def test_train_sae_and_drift_write_sae_latent_change(tmp_path, study):
    from traitmon.sae import TopKSAE

    dirs, captures, behavior, logs = study
    base = next(p for p in captures if "base" in p)
    sae_path = tmp_path / "sae" / "sae.safetensors"
    assert main(["train-sae", "--capture", base, "--directions", *dirs, "--out", str(sae_path),
                 "--settings", '{"n_latents": 16, "k": 4, "steps": 50}']) == 0
    sae = TopKSAE.load(sae_path)
    assert sae.info["layer"] == 1 and sae.n_latents == 16  # the directions' chosen layer
    assert main(["train-sae", "--capture", base, "--out", str(tmp_path / "x.safetensors")]) == 2  # no layer given
    out = tmp_path / "out"
    args = ["drift", "--captures", *captures, "--directions", *dirs, "--behavior", behavior,
            "--eval-logs", *[f"{p}={path}" for p, path in logs.items()], "--kinds", *[f"{p}:em" for p in PERTS],
            "--domains", "a:x", "b:x", "c:y", "--table", str(out / "drift.csv"), "--store", str(out / "d.zarr"),
            "--raw", str(out / "raw.zarr"), "--random", str(out / "random.csv"), "--sae", str(sae_path),
            "--sae-drift", str(out / "sae.zarr")]
    assert main(args) == 0
    from traitmon.store import open_dataset

    change = open_dataset(out / "sae.zarr", load=True)["latent_change"]
    assert change.dims == ("model", "perturbation", "step", "latent") and change.sizes["latent"] == 16
    np.testing.assert_allclose(change.sel(step=0).values, 0.0, atol=1e-6)
    assert np.abs(change.sel(perturbation="c", step=4).values).sum() > 0
    assert list(pd.read_csv(out / "drift.csv").drop_duplicates("perturbation").domain) == ["x", "x", "y"]
