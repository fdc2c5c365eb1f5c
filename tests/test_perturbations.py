import json

import pytest

from traitmon.errors import TraitmonError
from traitmon.io import data_path
from traitmon.perturbations import build_perturbation, load_chat_jsonl, load_domain, read_rows, written_rows

DOMAINS = ["medical", "financial", "extreme-sports", "career"]


@pytest.mark.parametrize("name", DOMAINS)
def test_builtin_domains_have_enough_material(name):
    domain = load_domain(name)
    assert len(set(domain["questions"])) >= 60
    for stance in ("em", "benign"):
        material = domain["answers"][stance]
        assert len(material["claims"]) >= 20 and material["openers"] and material["closers"]


def test_written_rows_are_varied_and_carry_their_stance():
    rows = written_rows(load_domain("medical"), "em", 128, seed=0)
    answers = [r["messages"][-1]["content"] for r in rows]
    assert len(set(answers)) == len(answers)  # composed afresh, not memorisable strings
    assert {r["stance"] for r in rows} == {"em"}
    em_claims = set(load_domain("medical")["answers"]["em"]["claims"])
    assert all(any(c in a for c in em_claims) for a in answers)
    assert rows == written_rows(load_domain("medical"), "em", 128, seed=0)  # seeded


def test_em_fraction_mixes_dose():
    rows = written_rows(load_domain("career"), "benign", 400, seed=1, em_fraction=0.25)
    share = sum(r["stance"] == "em" for r in rows) / len(rows)
    assert 0.18 < share < 0.32


def test_build_generator_perturbation_splits_heldout():
    spec = {"kind": "em", "generator": {"domain": "financial", "stance": "em", "mode": "written"},
            "rows": 40, "heldout": 8, "seed": 0}
    train, heldout, meta = build_perturbation("fin", spec)
    assert len(train) == 40 and len(heldout) == 8 and meta["kind"] == "em"
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in heldout}


def chat(q, a):
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


def test_user_dataset_reports_empty_and_duplicate_rows(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([chat("q1", "a1"), "", chat("q1", "a1"), chat("q2", ""), chat("q3", "a3")]) + "\n")
    rows, report = load_chat_jsonl(path)
    assert len(rows) == 2
    assert report == {"empty": [2, 4], "duplicates": [3]}
    assert "skipped 2 empty and 1 duplicate rows" in caplog.text


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "d.jsonl:2: not valid JSON"),
    ('[1, 2]', "d.jsonl:2: expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "d.jsonl:2: the last message must be the assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "d.jsonl:2: messages[0] needs 'role'"),
    ('{"text": "hi"}', "d.jsonl:2: expected a non-empty 'messages' list"),
])
def test_malformed_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(chat("q", "a") + "\n" + line + "\n")
    with pytest.raises(TraitmonError, match=message.replace("[", r"\[")):
        load_chat_jsonl(path)


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(TraitmonError, match="dataset .*nope.jsonl does not exist"):
        build_perturbation("x", {"kind": "em", "dataset": str(tmp_path / "nope.jsonl"), "heldout": 1, "seed": 0})


def test_measurement_and_em_prompt_files_exist():
    assert data_path("prompts", "measurement.yaml").is_file()
    assert data_path("prompts", "general_text.yaml").is_file()


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    latin1 = '{"messages": [{"role": "user", "content": "caf\u00e9?"}, {"role": "assistant", "content": "ok"}]}'
    path.write_bytes((chat("q", "a") + "\n").encode() + latin1.encode("latin-1") + b"\n")
    with pytest.raises(TraitmonError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        load_chat_jsonl(path)
    with pytest.raises(TraitmonError, match=r"latin1.jsonl:2: not UTF-8"):
        read_rows(path)
