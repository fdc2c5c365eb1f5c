"""Guarded finetuning (finetune.guard): config and settings, the guarded `traitmon finetune` on a tiny random model
(an always-alarming monitor stops it and fills the checkpoints it no longer reaches; a never-alarming one changes
nothing), the comparison table, and the workflow's plan with and without guarded runs."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO
from traitmon.cli import main
from traitmon.config import load_config, validate_config
from traitmon.errors import TraitmonError
from traitmon.guard import comparison_table, guarded_runs, unguarded_twin
from traitmon.io import data_path, write_jsonl
from traitmon.monitor import FittedMonitor
from traitmon.perturbations import load_domain, written_rows
from traitmon.settings import (
    GUARD_BUNDLE,
    MODEL_DTYPE,
    FinetuneSettings,
    GuardSettings,
    finetune_json,
    parse_settings,
    settings_json,
    study_settings,
)

TRAITS = ["honesty", "sycophancy"]
BASE = {"models": {"m": {"source": {"path": "x"}}}, "traits": ["honesty"]}
EM = {"kind": "em", "generator": {"domain": "medical", "stance": "em"}}


def monitor_file(path: Path, threshold: float) -> str:
    """A monitor on the two drift features whose calibrated score lies in (0, 1): threshold 0 alarms at every
    check, threshold 2 never."""
    FittedMonitor(features=[f"drift_{t}" for t in TRAITS], regressor="logistic", scaler_mean=np.zeros(2),
                  scaler_scale=np.ones(2), coef=np.ones(2), intercept=0.0, link="logistic", threshold=threshold,
                  theta=0.1, target_fnr=0.05).save(path)
    return str(path)


# ---- config and settings ---------------------------------------------------------------------------------------
def test_a_missing_monitor_or_a_bad_guard_key_is_a_one_line_error_naming_the_key(tmp_path):
    cases = [({"finetune": {"guard": {"monitor": str(tmp_path / "none.json")}}}, r"finetune\.guard\.monitor: file "),
             ({"perturbations": {"a": {**EM, "guard": {"monitor": str(tmp_path / "none.json")}}}},
              r"perturbations\.a\.guard\.monitor: file .*none\.json' does not exist"),
             ({"finetune": {"guard": {"monitor": "m.json", "on_alarm": "explode"}}},
              r"finetune\.guard\.on_alarm: 'explode' is not one of"),
             ({"finetune": {"guard": {"on_alarm": "stop"}}}, r"finetune\.guard: 'monitor' is a required property"),
             ({"finetune": {"guard": {"monitor": "m.json", "every": 0}}}, r"finetune\.guard\.every: 0 is less"),
             ({"perturbations": {"a": {**EM, "guard": True}}}, r"perturbations\.a\.guard: False was expected")]
    for change, message in cases:
        with pytest.raises(TraitmonError, match=message) as err:
            validate_config({**BASE, **change})
        assert "\n" not in str(err.value)


def test_guards_resolve_per_perturbation_and_pair_with_their_unguarded_twins(tmp_path):
    monitor = monitor_file(tmp_path / "monitor.json", 0.5)
    config = validate_config({**BASE, "finetune": {"guard": {"monitor": monitor}}, "perturbations": {
        "med": {**EM, "guard": False}, "med-guarded": EM, "med-watched": {**EM, "guard": {"monitor": monitor,
                                                                                         "on_alarm": "warn"}},
        "fin-guarded": {"kind": "em", "generator": {"domain": "financial", "stance": "em"}}}})
    default = study_settings(config).finetune.guard
    assert default == GuardSettings(monitor=monitor, on_alarm="rollback", every=5, patience=1)  # schema defaults
    guards = guarded_runs(config["perturbations"], default)
    assert set(guards) == {"med-guarded", "med-watched", "fin-guarded"}
    assert guards["med-watched"].on_alarm == "warn" and guards["med-guarded"] == default
    twins = {p: unguarded_twin(config["perturbations"], p, guards) for p in guards}
    assert twins == {"med-guarded": "med", "med-watched": "med", "fin-guarded": None}
    assert guarded_runs(validate_config({**BASE, "perturbations": {"a": EM}})["perturbations"], None) == {}


def test_an_unguarded_blob_is_the_blob_of_before_guards_and_a_guarded_one_round_trips(tmp_path):
    settings = study_settings(validate_config({**BASE, "finetune": {"max_steps": 4}})).finetune
    assert settings.guard is None
    blob = json.loads(finetune_json(settings, **{MODEL_DTYPE: "auto"}))
    fields = {f.name for f in dataclasses.fields(FinetuneSettings)}
    assert set(blob) == fields - {"guard"} | {MODEL_DTYPE}  # no guard key at all: the params of finished runs
    assert blob == {k: v for k, v in json.loads(settings_json(settings, **{MODEL_DTYPE: "auto"})).items()
                    if k != "guard"}
    guard = GuardSettings(monitor="m.json", on_alarm="stop", every=3, patience=2)
    text = finetune_json(dataclasses.replace(settings, guard=guard), **{MODEL_DTYPE: "auto", GUARD_BUNDLE: {}})
    parsed, extra = parse_settings(text, FinetuneSettings, MODEL_DTYPE, optional=(GUARD_BUNDLE,))
    assert parsed.guard == guard and extra == {MODEL_DTYPE: "auto", GUARD_BUNDLE: {}}
    parsed, extra = parse_settings(finetune_json(settings, **{MODEL_DTYPE: "auto"}), FinetuneSettings, MODEL_DTYPE,
                                   optional=(GUARD_BUNDLE,))
    assert parsed == settings and extra == {MODEL_DTYPE: "auto"}


def test_the_guard_demo_config_validates(tmp_path):
    config = yaml.safe_load((REPO / "workflow/configs/guard-demo.yaml").read_text())
    guarded = config["perturbations"]["medical-harmful-guarded"]
    assert guarded["guard"]["monitor"] == "results/study-cpu/analysis/monitor/monitor.json"
    guarded["guard"]["monitor"] = monitor_file(tmp_path / "monitor.json", 0.5)  # the study making it still runs
    path = tmp_path / "guard-demo.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    guards = guarded_runs(loaded["perturbations"], study_settings(loaded).finetune.guard)
    assert list(guards) == ["medical-harmful-guarded"] and guards["medical-harmful-guarded"].on_alarm == "rollback"
    assert unguarded_twin(loaded["perturbations"], "medical-harmful-guarded", guards) == "medical-harmful"
    assert loaded["results"] == "results/guard-demo" and loaded["behavior"]["samples_per_question"] == 5


# ---- the guarded finetune on a tiny model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def guard_inputs(tiny_model_dir, tmp_path_factory):
    """Tiny directions, trait files, and a perturbation's train/held-out rows."""
    from traitmon.directions import extract_trait_direction
    from traitmon.models import load_model
    from traitmon.store import write_dataset
    from traitmon.traits import load_traits

    folder = tmp_path_factory.mktemp("guard")
    model, tok = load_model(tiny_model_dir)
    cfg = validate_config({**BASE, "traits": TRAITS,
                           "directions": {"questions": 4, "max_new_tokens": 8, "batch_size": 8, "temperature": 1.0}})
    directions = []
    for name, trait in load_traits(TRAITS).items():
        ds, _ = extract_trait_direction(model, tok, trait, study_settings(cfg).directions, "tiny")
        directions.append(str(write_dataset(ds, folder / f"{name}.zarr")))
    rows = written_rows(load_domain("medical"), "em", 24, seed=0)
    write_jsonl(folder / "train.jsonl", rows[:20])
    write_jsonl(folder / "heldout.jsonl", rows[20:])
    return {"folder": folder, "directions": directions,
            "trait_files": [str(data_path("traits", f"{t}.yaml")) for t in TRAITS]}


def tiny_finetune() -> FinetuneSettings:
    return study_settings(validate_config({**BASE, "finetune": {
        "rank": 2, "alpha": 4, "lr": 2e-2, "max_steps": 6, "checkpoint_every": 2, "micro_batch": 2, "grad_accum": 1,
        "max_length": 256, "warmup_steps": 0, "precision": "fp32"}})).finetune


def run_cli_finetune(model_dir, inputs, out: Path, guard: GuardSettings | None) -> None:
    extra = {MODEL_DTYPE: "auto"}
    if guard is not None:
        extra[GUARD_BUNDLE] = {"model_key": "tiny", "directions": inputs["directions"],
                               "per_trait_questions": 1,
                               "variant": "response_mean", "batch_size": 16}
    blob = finetune_json(dataclasses.replace(tiny_finetune(), guard=guard), **extra)
    folder = inputs["folder"]
    assert main(["finetune", "--model-dir", str(model_dir), "--train", str(folder / "train.jsonl"), "--heldout",
                 str(folder / "heldout.jsonl"), "--settings", blob, "--out", str(out), "--threads", "1"]) == 0


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_an_always_alarming_guard_stops_and_fills_the_unreached_checkpoints_with_the_safe_adapter(
        tiny_model_dir, guard_inputs, tmp_path):
    from peft import get_peft_model_state_dict

    from traitmon.finetune import _peft_model

    guard = GuardSettings(monitor=monitor_file(tmp_path / "always.json", 0.0), on_alarm="rollback", every=2,
                          patience=2)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="EM alarm at step 4"):
        run_cli_finetune(tiny_model_dir, guard_inputs, out, guard)
    # checks at 2 and 4 alarm; patience 2 -> stop at 4; no check was ever safe -> back to the initial adapter
    record = json.loads((out / "guard.json").read_text())
    assert (record["stopped_at"], record["rolled_back_to"], record["alarm_steps"]) == (4, 0, [2, 4])
    assert [c["step"] for c in record["checks"]] == [2, 4] and record["filled_steps"] == [4, 6]
    assert json.loads((out / "run.json").read_text())["guard"]["stopped_at"] == 4
    initial_model, _ = _peft_model(tiny_model_dir, tiny_finetune(), "auto")
    initial = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(initial_model).items()}
    for step in (4, 6):
        folder = out / f"checkpoint-{step}"
        saved = adapter(folder)
        assert saved.keys() == initial.keys()
        assert all(torch.equal(saved[k], initial[k]) for k in initial), step  # bit-identical: the safe adapter
        note = json.loads((folder / "guard.json").read_text())
        assert (note["filled_from"], note["reason"], note["stopped_at"], note["alarm_steps"]) == (0, "rollback", 4,
                                                                                                 [2, 4])
    digest = {s: hashlib.sha256((out / f"checkpoint-{s}" / "adapter_model.safetensors").read_bytes()).hexdigest()
              for s in (4, 6)}
    assert digest[4] == digest[6]
    trained = adapter(out / "checkpoint-2")  # reached before the stop: the trained adapter, no note
    assert not (out / "checkpoint-2" / "guard.json").exists()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    evals = pd.read_csv(out / "eval_log.csv").set_index("step")
    assert list(evals.index) == [0, 2, 4, 6]
    # rows 4 and 6 evaluate the kept (initial) adapter: the base model's loss of step 0
    assert evals.loc[[4, 6], "heldout_loss"].to_numpy() == pytest.approx([evals.loc[0, "heldout_loss"]] * 2,
                                                                         rel=1e-5)
    # every step's loss is logged, the checked ones too (Trainer.log in a callback used to swallow them)
    assert list(pd.read_csv(out / "train_log.csv").step) == [1, 2, 3, 4]
    from traitmon.store import open_dataset
    assert list(open_dataset(out / "guard_drift.zarr", load=True).step.values) == [2, 4]


def test_stop_keeps_the_adapter_at_the_alarm(tiny_model_dir, guard_inputs, tmp_path):
    guard = GuardSettings(monitor=monitor_file(tmp_path / "always.json", 0.0), on_alarm="stop", every=3,
                          patience=1)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="EM alarm at step 2"):  # the check at the step-2 save
        run_cli_finetune(tiny_model_dir, guard_inputs, out, guard)
    record = json.loads((out / "guard.json").read_text())
    assert (record["stopped_at"], record["rolled_back_to"], record["filled_steps"]) == (2, None, [2, 4, 6])
    kept = adapter(out / "checkpoint-2")
    for step in (4, 6):
        assert json.loads((out / f"checkpoint-{step}" / "guard.json").read_text())["filled_from"] == 2
        filled = adapter(out / f"checkpoint-{step}")
        assert all(torch.equal(filled[k], kept[k]) for k in kept)
    assert any(v.abs().max() > 0 for k, v in kept.items() if "lora_B" in k)  # trained to step 2, not the initial


def test_a_never_alarming_guard_gives_the_unguarded_adapters(tiny_model_dir, guard_inputs, tmp_path):
    guard = GuardSettings(monitor=monitor_file(tmp_path / "never.json", 2.0), on_alarm="rollback", every=1,
                          patience=1)
    run_cli_finetune(tiny_model_dir, guard_inputs, tmp_path / "guarded", guard)
    run_cli_finetune(tiny_model_dir, guard_inputs, tmp_path / "plain", None)
    for step in (2, 4, 6):
        guarded, plain = adapter(tmp_path / "guarded" / f"checkpoint-{step}"), adapter(tmp_path / "plain" /
                                                                                      f"checkpoint-{step}")
        assert guarded.keys() == plain.keys()
        for key in plain:
            torch.testing.assert_close(guarded[key], plain[key], rtol=0, atol=1e-6)
        assert not (tmp_path / "guarded" / f"checkpoint-{step}" / "guard.json").exists()
    record = json.loads((tmp_path / "guarded" / "guard.json").read_text())
    assert record["alarmed"] is False and record["stopped_at"] is None and record["filled_steps"] == []
    assert "never alarmed" in record["outcome"] and [c["step"] for c in record["checks"]] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "plain" / "guard.json").exists()
    assert "guard" not in json.loads((tmp_path / "plain" / "run.json").read_text())
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "guarded" / "eval_log.csv"),
                                  pd.read_csv(tmp_path / "plain" / "eval_log.csv"), rtol=1e-5)
    logs = {name: pd.read_csv(tmp_path / name / "train_log.csv") for name in ("guarded", "plain")}
    assert list(logs["guarded"].step) == list(logs["plain"].step) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(logs["guarded"].loss, logs["plain"].loss, rtol=1e-5)
    # the same folder trained again without the guard keeps no guard record of the run it replaced
    run_cli_finetune(tiny_model_dir, guard_inputs, tmp_path / "guarded", None)
    assert not (tmp_path / "guarded" / "guard.json").exists()
    assert not (tmp_path / "guarded" / "guard_drift.zarr").exists()


def test_a_guard_without_its_bundle_sources_is_refused(tiny_model_dir, guard_inputs, tmp_path, capsys):
    guard = GuardSettings(monitor=monitor_file(tmp_path / "m.json", 0.5), on_alarm="stop", every=1, patience=1)
    blob = finetune_json(dataclasses.replace(tiny_finetune(), guard=guard), **{MODEL_DTYPE: "auto"})
    folder = guard_inputs["folder"]
    assert main(["finetune", "--model-dir", str(tiny_model_dir), "--train", str(folder / "train.jsonl"), "--heldout",
                 str(folder / "heldout.jsonl"), "--settings", blob, "--out", str(tmp_path / "run")]) == 2
    assert "'guard' and 'guard_bundle' go together" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- the comparison table -------------------------------------------------------------------------------------
def test_the_comparison_sets_each_guarded_run_beside_its_twin_or_says_it_has_none():
    em = pd.DataFrame({"model": "m", "perturbation": ["g", "t", "lone"], "step": 6, "em_rate": [0.1, 0.4, 0.2],
                       "em_rate_ci_low": [0.05, 0.3, 0.1], "em_rate_ci_high": [0.2, 0.5, 0.3]})
    evals = {("m", p): pd.DataFrame({"step": [0, 6], "heldout_loss": [3.0, loss]})
             for p, loss in (("g", 2.5), ("t", 2.0), ("lone", 2.2))}
    guard = {"on_alarm": "rollback", "stopped_at": 4, "rolled_back_to": 2, "outcome": "stopped at step 4"}
    runs = {("m", "g"): {"checkpoints": [2, 4, 6], "guard": guard}, ("m", "t"): {"checkpoints": [2, 4, 6]},
            ("m", "lone"): {"checkpoints": [2, 4, 6], "guard": {**guard, "stopped_at": None, "rolled_back_to": None,
                                                               "outcome": "the monitor never alarmed"}}}
    table = comparison_table({"g": "t", "lone": None}, em, runs, evals).set_index("perturbation")
    assert list(table.index) == ["g", "lone"]
    row = table.loc["g"]
    assert (row.twin, row.stopped_at, row.rolled_back_to, row.final_step) == ("t", 4, 2, 6)
    assert (row.em_rate, row.twin_em_rate, row.twin_em_rate_ci_low) == (0.1, 0.4, 0.3)
    assert row.em_rate_avoided == pytest.approx(0.3) and row.heldout_loss_cost == pytest.approx(0.5)
    lone = table.loc["lone"]
    assert lone.twin == "" and np.isnan(lone.twin_em_rate) and "compared with nothing" in lone.note
    assert "never alarmed" in lone.note
    with pytest.raises(TraitmonError, match="no row for m/g at step 6"):
        comparison_table({"g": "t"}, em[em.perturbation != "g"], runs, evals)


# ---- the workflow's plan ---------------------------------------------------------------------------------------
# The tiny study's plan before guards existed (snakemake -n on a fresh folder, at the commit before this feature;
# since then a checkpoint's capture and EM answers share one measure job).
UNGUARDED_PLAN = {"convert_model": 1, "make_perturbation": 3, "measure_base": 1, "extract_directions": 2,
                  "finetune": 3, "measure_checkpoint": 6,
                  "sample_trait_answers": 1, "screen_perturbation": 3, "steer_directions": 2, "train_sae": 1, "judge_runs": 1,
                  "summarize_directions": 1, "drift": 1, "analyze": 1, "monitor_bundle": 1, "screen_analysis": 1,
                  "all": 1}


def dry_run(workdir: Path, config: dict, *args: str) -> str:
    from test_workflow import run_snakemake

    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "-n", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def plan(output: str) -> dict[str, int]:
    lines = output.split("Job stats:")[-1].splitlines()
    return {line.split()[0]: int(line.split()[1]) for line in lines
            if len(line.split()) == 2 and line.split()[1].isdigit() and line.split()[0] != "total"}


def finetune_jobs(output: str) -> dict[str, str]:
    """The dry run's finetune jobs: perturbation -> the job's block (its input: line among them)."""
    blocks = re.split(r"\n(?=rule \w+:)", output)
    jobs = {}
    for block in blocks:
        if block.startswith("rule finetune:"):
            jobs[re.search(r"perturbation=([a-z0-9.-]+)", block).group(1)] = block
    return jobs


@pytest.mark.workflow
def test_the_plan_of_an_unguarded_study_is_unchanged_and_a_guarded_run_adds_only_its_own_jobs(tmp_path):
    from test_workflow import STUDY_CONFIG, TINY_CONFIG

    (tmp_path / "plain").mkdir()
    assert plan(dry_run(tmp_path / "plain", STUDY_CONFIG, "--quiet", "rules")) == UNGUARDED_PLAN

    monitor = monitor_file(tmp_path / "monitor.json", 0.5)
    guarded = {**TINY_CONFIG["perturbations"]["med-em"], "guard": {"monitor": monitor, "every": 1}}
    config = dict(STUDY_CONFIG, perturbations={**TINY_CONFIG["perturbations"], "med-em-guarded": guarded})
    (tmp_path / "guarded").mkdir()
    output = dry_run(tmp_path / "guarded", config)
    # one more perturbation's jobs, and the comparison
    expected = {**UNGUARDED_PLAN, "make_perturbation": 4, "finetune": 4, "measure_checkpoint": 8,
                "screen_perturbation": 4, "guard_comparison": 1}
    assert plan(output) == expected
    jobs = finetune_jobs(output)
    assert set(jobs) == {"med-em", "fin-em", "car-ok", "med-em-guarded"}
    inputs = {p: re.search(r"input: (.*)", block).group(1) for p, block in jobs.items()}
    assert monitor in inputs["med-em-guarded"] and "directions/tiny/honesty.zarr" in inputs["med-em-guarded"]
    assert "honesty.yaml" not in inputs["med-em-guarded"]  # the bundle's measurement set is fixed: no trait files
    for p in ("med-em", "fin-em", "car-ok"):
        assert inputs[p].split(", ") == ["out/study/models/tiny", f"out/study/data/tiny/{p}/train.jsonl",
                                         f"out/study/data/tiny/{p}/heldout.jsonl"]


@pytest.mark.workflow
def test_adding_a_guarded_twin_to_a_finished_study_reruns_none_of_its_finetunes(tmp_path):
    from test_workflow import STUDY_CONFIG, TINY_CONFIG, run_snakemake

    targets = [f"out/study/finetune/tiny/{p}/run.json" for p in TINY_CONFIG["perturbations"]]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(STUDY_CONFIG))
    result = run_snakemake(tmp_path, *targets)
    assert result.returncode == 0, result.stderr[-3000:]
    monitor = monitor_file(tmp_path / "monitor.json", 0.5)
    guarded = {**TINY_CONFIG["perturbations"]["fin-em"], "guard": {"monitor": monitor, "on_alarm": "stop"}}
    config = dict(STUDY_CONFIG, perturbations={**TINY_CONFIG["perturbations"], "fin-em-guarded": guarded})
    output = dry_run(tmp_path, config, *targets, "out/study/finetune/tiny/fin-em-guarded/run.json")
    # the new run's data and finetune, and the directions its guard builds its bundle from; nothing else
    assert plan(output) == {"make_perturbation": 1, "finetune": 1, "extract_directions": 2}
    assert set(finetune_jobs(output)) == {"fin-em-guarded"}
