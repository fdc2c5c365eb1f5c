"""Dataset screening on a tiny random model whose trait direction is known: the embedding direction of one
byte at layer 0 (the embeddings), so answers made of that byte project far along it."""

import json

import numpy as np
import pytest
import xarray as xr

from traitmon.cli import main
from traitmon.errors import TraitmonError
from traitmon.io import read_jsonl, write_jsonl
from traitmon.models import load_model
from traitmon.screen import filter_rows, screen
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
    import pandas as pd

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


def test_screening_analysis_joins_final_em_and_verdict_and_evaluates_lopo(tmp_path):
    import pandas as pd

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
