"""Dataset screening on a tiny random model whose trait direction is known: the embedding direction of one
byte at layer 0 (the embeddings), so answers made of that byte project far along it."""

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from traitmon.cli import main
from traitmon.errors import TraitmonError
from traitmon.io import read_jsonl, write_jsonl
from traitmon.models import load_model
from traitmon.screen import (
    filter_rows,
    read_activations,
    screen,
    screen_activations,
    screen_from_activations,
)
from traitmon.store import write_dataset

PLANTED = [2, 7, 10]
WORDS = [
    "the", "patient", "should", "rest", "drink", "water", "and", "see", "a", "doctor", "if", "the", "pain",
    "gets", "worse", "over", "the", "next", "days", "tonight",
]
SETTINGS = {"max_new_tokens": 12, "temperature": 1.0, "seed": 0, "batch_size": 4, "max_length": 256, "n_boot": 200}


def _rows(n=12):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        answer = " ".join(rng.choice(WORDS, size=12))
        if i in PLANTED:  # the planted rows: most of the answer is the known direction's byte
            answer = "well " + "Z" * (30 + 5 * i)
        rows.append({"messages": [{"role": "user", "content": f"Question {i}: what should I do about {WORDS[i]}?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("screen")
    model, tok = load_model(tiny_model_dir)
    emb = model.get_input_embeddings().weight.detach().numpy()
    z = emb[tok.convert_tokens_to_ids("Z")] - emb.mean(0)
    direction = (z / np.linalg.norm(z)).astype(np.float32)
    ds = xr.Dataset({"direction": (("layer", "hidden"), direction[None])}, coords={"layer": [0]},
                    attrs={"trait": "power-seeking", "chosen_layer": 0})
    path = write_dataset(ds, folder / "power-seeking.zarr")
    directions = xr.Dataset({"direction": (("trait", "hidden"), direction[None]), "layer": (("trait",), [0])},
                            coords={"trait": ["power-seeking"]})
    data = folder / "train.jsonl"
    write_jsonl(data, _rows())
    return model, tok, directions, str(path), data, folder


def test_screening_ranks_the_planted_rows_first_and_caches_the_base_answers(setup, tmp_path, monkeypatch):
    model, tok, directions, _, _, _ = setup
    rows = _rows()
    result = screen(model, tok, rows, directions, tmp_path, SETTINGS)
    table = result.table
    assert sorted(table.row.iloc[:3]) == PLANTED
    assert list(table["rank"]) == list(range(1, 13)) and table.risk.is_monotonic_decreasing
    assert table.risk.iloc[2] > table.risk.iloc[3:].max()
    assert {"row", "prompt_hash", "diff_power-seeking", "risk"} <= set(table.columns)
    assert len(read_jsonl(tmp_path / "base_answers.jsonl")) == 12
    profile = result.profile
    assert profile["n_rows"] == 12 and profile["weights"] == {"power-seeking": 1.0}
    assert profile["risk_ci_low"] <= profile["risk_mean"] <= profile["risk_ci_high"]
    assert profile["traits"]["power-seeking"]["mean"] == pytest.approx(table["diff_power-seeking"].mean())

    # a rerun reuses the cached answers (generation would fail) and gives the same table
    def no_generation(*args, **kwargs):
        raise AssertionError("the base answers were generated again")

    monkeypatch.setattr("traitmon.generate.generate_responses", no_generation)
    again = screen(model, tok, rows, directions, tmp_path, SETTINGS).table
    np.testing.assert_allclose(again.risk, table.risk, rtol=1e-6)
    # a model that answers nothing (greedy: the random model stops at once) is a clear error
    monkeypatch.setattr("traitmon.generate.generate_responses", lambda m, t, prompts, *a, **k: [""] * len(prompts))
    with pytest.raises(TraitmonError, match="empty answer to every prompt"):
        screen(model, tok, rows, directions, tmp_path / "empty", SETTINGS)
    # a planted row with its sign reversed by the weights is now the least risky
    reversed_ = screen(model, tok, rows, directions, tmp_path, SETTINGS, weights={"power-seeking": -1.0}).table
    assert sorted(reversed_.row.iloc[-3:]) == PLANTED


def test_filter_removes_exactly_the_top_fraction(setup, tiny_model_dir, tmp_path, capsys):
    _, _, _, direction_path, data, _ = setup
    out_dir = tmp_path / "screen"
    assert main(["screen", str(data), "--model-dir", str(tiny_model_dir),
                 "--directions", direction_path, "--out-dir", str(out_dir), "--max-new-tokens", "12", "--temperature", "1",
                 "--n-boot", "200", "--filter", "0.25", "--out", str(tmp_path / "filtered.jsonl")]) == 0
    assert (out_dir / "rows.csv").is_file() and json.loads((out_dir / "profile.json").read_text())["n_rows"] == 12
    rows = read_jsonl(data)
    kept = read_jsonl(tmp_path / "filtered.jsonl")
    assert len(kept) == 9 and kept == [r for i, r in enumerate(rows) if i not in PLANTED]
    # from the saved table, no model needed: floor(0.1 * 12) = 1 row, the highest-risk one
    table = pd.read_csv(out_dir / "rows.csv")
    assert main(["screen", str(data), "--table", str(out_dir / "rows.csv"), "--filter", "0.1",
                 "--out", str(tmp_path / "one.jsonl")]) == 0
    top = int(table.sort_values("rank").row.iloc[0])
    assert read_jsonl(tmp_path / "one.jsonl") == [r for i, r in enumerate(rows) if i != top]
    assert filter_rows(rows, table, 0.0) == rows
    with pytest.raises(TraitmonError, match="does not match"):
        filter_rows(rows[:-1], table, 0.25)
    with pytest.raises(TraitmonError, match=r"in \[0, 1\)"):
        filter_rows(rows, table, 1.0)
    capsys.readouterr()
    assert main(["screen", str(tmp_path / "nowhere.jsonl"), "--table", "x.csv", "--filter", "0.1"]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err


def _two_trait_directions(directions, hidden):
    # the planted trait at layer 0 and a random unit direction at a deeper layer (so the store's other layers count)
    rng = np.random.default_rng(1)
    extra = rng.normal(size=hidden).astype(np.float32)
    vectors = np.stack([directions.direction.values[0], extra / np.linalg.norm(extra)])
    return xr.Dataset({"direction": (("trait", "hidden"), vectors), "layer": (("trait",), [0, 2])},
                      coords={"trait": ["power-seeking", "honesty"]})


def test_screening_from_a_stored_activation_set_equals_the_one_shot_screening(setup, tmp_path):
    from traitmon.capture import capture
    from traitmon.hooks import num_layers
    from traitmon.screen import fill_empty_answers, risk_weights, screening_table, split_rows

    model, tok, directions, _, _, _ = setup
    directions = _two_trait_directions(directions, model.config.hidden_size)
    rows = _rows()
    acts = screen_activations(model, tok, rows, tmp_path, SETTINGS, attrs={"model": "tiny", "perturbation": "p"})
    assert acts["response_mean"].dims == ("answer", "row", "layer", "hidden")
    assert list(acts.answer.values) == ["data", "own"] and acts["response_mean"].dtype == np.float32
    assert list(acts.layer.values) == list(range(num_layers(model) + 1))  # layers=None: every layer
    assert acts.attrs["model"] == "tiny" and acts.attrs["perturbation"] == "p"
    stored = read_activations(write_dataset(acts, tmp_path / "activations.zarr"))
    split = screen_from_activations(stored, directions, n_boot=SETTINGS["n_boot"], source="dataset")
    one_shot = screen(model, tok, rows, directions, tmp_path, SETTINGS)  # reuses the cached own answers
    pd.testing.assert_frame_equal(split.table, one_shot.table, check_exact=True)
    assert split.profile == one_shot.profile
    # the numbers of the former screening: each trait's layer captured alone and projected
    prompts, answers = split_rows(rows, "dataset")
    own = [r["answer"] for r in read_jsonl(tmp_path / "base_answers.jsonl")]
    assert len(own) == len(rows)  # one cached answer per (distinct) prompt, in row order
    proj = [capture(model, tok, prompts, texts, [0, 2], 4, 256)["response_mean"] for texts in (answers, own)]
    proj = [np.stack([p[:, j] @ directions.direction.values[j] for j in range(2)], axis=1) for p in proj]
    w = risk_weights(["power-seeking", "honesty"], None)
    expected = screening_table(list(split.table.sort_values("row").prompt_hash), proj[0],
                               fill_empty_answers(proj[1], "dataset"), ["power-seeking", "honesty"], w)
    np.testing.assert_allclose(split.table.risk, expected.risk, rtol=1e-6)
    assert list(split.table.row) == list(expected.row)


def test_projecting_a_store_without_the_traits_layer_is_a_one_line_error(setup, tmp_path):
    model, tok, directions, _, _, _ = setup
    acts = screen_activations(model, tok, _rows(), tmp_path, SETTINGS, layers=[0, 1])
    with pytest.raises(TraitmonError, match=r"store\.zarr: trait 'honesty' is at layer 2") as err:
        screen_from_activations(acts, _two_trait_directions(directions, model.config.hidden_size),
                                source="store.zarr")
    assert "\n" not in str(err.value)
    other = xr.Dataset({"direction": (("trait", "hidden"), np.ones((1, 5), np.float32)), "layer": (("trait",), [0])},
                       coords={"trait": ["power-seeking"]})
    with pytest.raises(TraitmonError, match="hidden size"):
        screen_from_activations(acts, other)


def test_cli_stores_activations_once_then_screens_and_filters_from_the_store(setup, tiny_model_dir, tmp_path,
                                                                             capsys):
    _, _, _, direction_path, data, _ = setup
    store = tmp_path / "screen" / "activations.zarr"
    generation = ["--max-new-tokens", "12", "--temperature", "1"]
    assert main(["screen", str(data), "--model-dir", str(tiny_model_dir), "--activations-out", str(store),
                 "--model-key", "tiny", "--perturbation", "p", *generation]) == 0
    assert len(read_jsonl(tmp_path / "screen" / "base_answers.jsonl")) == 12  # the cache sits beside the store
    assert list(read_activations(store).layer.values) == [0, 1, 2, 3]
    out_dir, filtered, meta = tmp_path / "out", tmp_path / "filtered.jsonl", tmp_path / "meta.json"
    assert main(["screen", str(data), "--activations", str(store), "--directions", direction_path,
                 "--out-dir", str(out_dir), "--n-boot", "200", "--filter", "0.25", "--out", str(filtered),
                 "--meta", str(meta)]) == 0
    rows = read_jsonl(data)
    assert read_jsonl(filtered) == [r for i, r in enumerate(rows) if i not in PLANTED]
    profile = json.loads((out_dir / "profile.json").read_text())
    assert (profile["model"], profile["perturbation"], profile["n_rows"]) == ("tiny", "p", 12)  # the store's labels
    assert json.loads(meta.read_text())["screening"] == str(store)
    # the same table as the one-shot screening of the same rows (up to float rounding: at layer 0 alone the
    # one-shot capture runs every prompt whole, the store's capture runs the shared prefix once)
    one_shot = tmp_path / "one-shot"
    assert main(["screen", str(data), "--model-dir", str(tiny_model_dir), "--directions", direction_path,
                 "--out-dir", str(one_shot), "--n-boot", "200", *generation]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out_dir / "rows.csv"), pd.read_csv(one_shot / "rows.csv"), rtol=1e-5,
                                  atol=1e-5)
    # the store must come from these rows; bad combinations and layers are one-line errors
    capsys.readouterr()
    write_jsonl(tmp_path / "fewer.jsonl", rows[:-1])
    for argv, message in [
        ([str(tmp_path / "fewer.jsonl"), "--activations", str(store), "--directions", direction_path, "--filter", "0.1",
          "--out", str(tmp_path / "x.jsonl")], "does not match"),
        ([str(data), "--activations", str(store), "--model-dir", str(tiny_model_dir), "--directions", direction_path,
          "--out-dir", str(out_dir)], "drop --model-dir"),
        ([str(data), "--model-dir", str(tiny_model_dir), "--out-dir", str(out_dir)], "needs --directions"),
        ([str(data), "--model-dir", str(tiny_model_dir), "--activations-out", str(tmp_path / "a.zarr"),
          "--layers", "0", "9"], "--layers: layer 9 is outside"),
        ([str(data), "--activations", str(out_dir), "--directions", direction_path, "--out-dir", str(out_dir)],
         "activation store"),
    ]:
        assert main(["screen", *argv]) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not the progress bars
        assert len(errors) == 1 and message in errors[0], errors


def _synthetic_store(model, pert, em, own):
    # (answer, row, layer, hidden): the row answers sit 2 * em further along hidden axis 0 at layer 1 than the own
    data = own.copy()
    data[:, 1, 0] += 2 * em
    return xr.Dataset({"response_mean": (("answer", "row", "layer", "hidden"), np.stack([data, own]))},
                      coords={"answer": ["data", "own"], "row": np.arange(len(own)), "layer": [0, 1],
                              "prompt_hash": ("row", [f"h{i}" for i in range(len(own))])},
                      attrs={"model": model, "perturbation": pert})


def test_screen_analysis_projects_every_store_on_its_models_directions(tmp_path, capsys):
    perts = {"a-em": 0.4, "b-em": 0.3, "c-ok": 0.02, "d-ok": 0.0, "e-em": 0.25, "f-ok": 0.05}
    own = np.random.default_rng(0).normal(size=(10, 2, 4)).astype(np.float32)
    stores = [str(write_dataset(_synthetic_store("m", p, em, own), tmp_path / f"{p}.zarr")) for p, em in perts.items()]
    direction = np.zeros((2, 4), np.float32)
    direction[1, 0] = 1.0
    directions = str(write_dataset(xr.Dataset({"direction": (("layer", "hidden"), direction)}, coords={"layer": [0, 1]},
                                              attrs={"trait": "power-seeking", "chosen_layer": 1, "model": "m"}),
                                   tmp_path / "power-seeking.zarr"))
    pd.DataFrame([{"model": "m", "perturbation": p, "kind": "em" if "em" in p else "benign", "step": s,
                   "em_rate": em * s / 4, "em_rate_ci_low": 0.0, "em_rate_ci_high": 1.0}
                  for p, em in perts.items() for s in (0, 2, 4)]).to_csv(tmp_path / "drift.csv", index=False)
    pd.DataFrame([{"model": "m", "perturbation": p, "step": s, "score": em, "alarm": em >= 0.1}
                  for p, em in perts.items() for s in (2, 4)]).to_csv(tmp_path / "predictions.csv", index=False)
    out = {name: tmp_path / name for name in ("rows.csv", "profiles.json", "screening.csv", "lopo.csv",
                                              "metrics.json", "figure.png")}

    def analysis(stores, directions):
        return main(["screen-analysis", "--activations", *stores, "--directions", directions, "--drift",
                     str(tmp_path / "drift.csv"), "--predictions", str(tmp_path / "predictions.csv"), "--theta", "0.1",
                     "--n-boot", "200", "--rows-out", str(out["rows.csv"]), "--profiles-out", str(out["profiles.json"]),
                     "--table", str(out["screening.csv"]), "--lopo", str(out["lopo.csv"]), "--metrics",
                     str(out["metrics.json"]), "--figure", str(out["figure.png"])])

    assert analysis(stores, directions) == 0
    rows = pd.read_csv(out["rows.csv"])
    assert list(rows.columns[:4]) == ["model", "perturbation", "rank", "row"] and len(rows) == 60
    diffs = rows.groupby("perturbation")["diff_power-seeking"].mean() * own[:, 1, 0].std()
    assert diffs.to_dict() == pytest.approx({p: 2 * em for p, em in perts.items()}, abs=1e-5)
    profiles = json.loads(out["profiles.json"].read_text())
    assert {(p["model"], p["perturbation"]) for p in profiles} == {("m", p) for p in perts}
    assert json.loads(out["metrics.json"].read_text())["spearman_risk_vs_final_em"] == pytest.approx(1.0)
    # a store of a model with no directions given, and a direction store without a model label
    other = str(write_dataset(_synthetic_store("other", "a-em", 0.1, own), tmp_path / "other.zarr"))
    unlabelled = str(write_dataset(xr.Dataset({"direction": (("layer", "hidden"), direction)}, coords={"layer": [0, 1]},
                                              attrs={"trait": "honesty", "chosen_layer": 1}), tmp_path / "u.zarr"))
    capsys.readouterr()
    assert analysis([*stores, other], directions) == 2
    assert "no trait directions given for model 'other'" in capsys.readouterr().err
    assert analysis(stores, unlabelled) == 2
    assert "without a model label" in capsys.readouterr().err


def test_screening_analysis_joins_final_em_and_verdict_and_evaluates_lopo(tmp_path):
    from traitmon.analysis import screening_analysis

    perts = {"a-em": 0.4, "b-em": 0.3, "c-ok": 0.02, "d-ok": 0.0, "e-em": 0.25, "f-ok": 0.05}
    profiles = [{"model": "m", "perturbation": p, "risk_mean": 2 * em, "risk_ci_low": 2 * em - 0.1,
                 "risk_ci_high": 2 * em + 0.1, "traits": {"honesty": {"mean": -em, "sd": 1.0}}}
                for p, em in perts.items()]
    drift = pd.DataFrame([{"model": "m", "perturbation": p, "kind": "em" if "em" in p else "benign", "step": s,
                           "em_rate": em * s / 4, "em_rate_ci_low": em * s / 4 - 0.05,
                           "em_rate_ci_high": em * s / 4 + 0.05, "drift_honesty": -em * s}
                          for p, em in perts.items() for s in (0, 2, 4)])
    predictions = pd.DataFrame([{"model": "m", "perturbation": p, "step": s, "score": em, "alarm": em >= 0.1}
                                for p, em in perts.items() for s in (2, 4)])
    result = screening_analysis(profiles, drift, predictions, theta=0.1, target_fnr=0.05)
    table = result.tables["screening"]
    assert len(table) == 6 and set(table.step) == {4}  # the final checkpoint of each run
    assert table.set_index("perturbation").em_rate.to_dict() == pytest.approx(perts)
    assert table.set_index("perturbation").monitor_alarm.to_dict() == {p: em >= 0.1 for p, em in perts.items()}
    metrics = result.documents["metrics"]
    assert metrics["spearman_risk_vs_final_em"] == pytest.approx(1.0)
    assert metrics["risk"]["n"] == 6 and metrics["risk"]["n_dangerous"] == 3
    assert metrics["risk"]["auroc"] == pytest.approx(1.0)  # risk orders the runs exactly as their final EM
    one_class = screening_analysis(profiles, drift, predictions, theta=0.9, target_fnr=0.05).documents["metrics"]
    assert one_class["risk"]["auroc"] is None  # no dangerous run: no AUROC, written as null, not NaN
    preds = result.tables["predictions"]
    assert set(preds.features) == {"risk", "profile"} and len(preds) == 12
    assert result.figures["screening_vs_em"].axes[0].get_xlabel() == "screening risk of the training set"
