"""The workflow itself, on a tiny random Llama: the DAG runs, outputs have the promised shape, a rerun
does nothing, and a bad config stops before any job with a readable message."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, TINY_SOURCE
from traitmon.precision import cpu_hardware
from traitmon.store import open_dataset

pytestmark = pytest.mark.workflow
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2"]

TINY_CONFIG = {
    "models": {"tiny": {"source": TINY_SOURCE, "params_b": 0.001}},
    "traits": ["honesty", "sycophancy"],
    "directions": {"questions": 6, "max_new_tokens": 6, "batch_size": 12, "temperature": 1.0},
    "steering": {"coefs": [-1.0, 0.0, 1.0], "questions": 2, "max_new_tokens": 4},
    "perturbations": {
        "med-em": {"kind": "em", "generator": {"domain": "medical", "stance": "em"}, "rows": 16, "heldout": 4},
        "fin-em": {"kind": "em", "generator": {"domain": "financial", "stance": "em"}, "rows": 16, "heldout": 4},
        "car-ok": {"kind": "benign", "generator": {"domain": "career", "stance": "benign"}, "rows": 16, "heldout": 4},
    },
    "finetune": {"rank": 2, "alpha": 4, "lr": 1e-2, "max_steps": 4, "checkpoint_every": 2, "micro_batch": 2,
                 "grad_accum": 1, "max_length": 384, "precision": "auto"},
    "capture": {"per_trait_questions": 1, "batch_size": 32, "precision": "auto"},  # as the embedded default
    "behavior": {"samples_per_question": 1, "trait_questions": 1, "max_new_tokens": 6, "batch_size": 32},
    "resources": {"threads": 1},
}


AUTO = "bf16" if cpu_hardware().native_bf16 else "fp32"  # what auto resolves to on this machine

# The tiny study writes under another results root than the default (config key `results`).
ROOT = "out/study"
STUDY_CONFIG = {**TINY_CONFIG, "results": ROOT}


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], check=False, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(STUDY_CONFIG))
    result = run_snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (workdir / "results").exists()  # everything went under the configured root
    return workdir


def test_direction_stage_outputs(tiny_study):
    results = tiny_study / ROOT
    summary = pd.read_csv(results / "directions/tiny/summary.csv")
    assert set(summary.trait) == {"honesty", "sycophancy"}
    assert {"layer", "separation", "effect_size", "steering_slope", "steering_spearman"} <= set(summary.columns)
    ds = open_dataset(results / "directions/tiny/honesty.zarr")
    assert ds["direction"].dims == ("layer", "hidden") and ds.attrs["trait"] == "honesty"
    assert (results / "directions/tiny/honesty.responses.jsonl").stat().st_size > 0
    cos = pd.read_csv(results / "directions/tiny/cosines.csv", index_col="trait")
    assert cos.loc["honesty", "honesty"] == pytest.approx(1.0, abs=1e-5)
    assert (results / "directions/tiny/separation_by_layer.png").stat().st_size > 10_000
    assert (results / "logs/directions/tiny/honesty.log").exists()


def test_finetune_capture_behavior_and_analysis_outputs(tiny_study):
    results = tiny_study / ROOT
    for pert in ("med-em", "fin-em", "car-ok"):
        for step in (2, 4):
            assert (results / f"finetune/tiny/{pert}/checkpoint-{step}/adapter_model.safetensors").is_file()
            cap = open_dataset(results / f"capture/tiny/{pert}/step-{step}.zarr")
            assert cap["response_mean"].dims == ("prompt", "layer", "hidden")
            assert cap.attrs["step"] == step and cap.attrs["perturbation"] == pert
            assert cap.attrs["precision"] == AUTO  # capture.precision auto, resolved here, reached every capture
    assert open_dataset(results / "directions/tiny/honesty.zarr").attrs["precision"] == AUTO
    assert open_dataset(results / "screen/tiny/med-em/activations.zarr").attrs["precision"] == AUTO
    assert json.loads((results / "analysis/tiny/monitor_bundle/bundle.json").read_text())["precision"] == AUTO
    assert json.loads((results / "finetune/tiny/med-em/run.json").read_text())["precision"] == AUTO
    # every job that computes says in its log what it chose and why
    for job, stage in (("finetune/tiny/med-em", "finetune"), ("measure/tiny/med-em/step-2", "capture"),
                       ("measure/tiny/med-em/step-2", "sampling"), ("directions/tiny/honesty", "directions")):
        assert f"precision[{stage}]: {AUTO} (cpu " in (results / f"logs/{job}.log").read_text()
    assert (results / "data/tiny/med-em/meta.json").is_file()
    scores = pd.read_csv(results / "behavior/embedded/tiny/em_scores.csv")
    assert set(scores.step) == {0, 2, 4} and len(scores) == 9
    drift = pd.read_csv(results / "analysis/drift.csv")
    assert {"model", "perturbation", "step", "em_rate", "drift_honesty", "drift_sycophancy"} <= set(drift.columns)
    assert (drift[drift.step == 0][["drift_honesty", "drift_sycophancy"]].abs() < 1e-6).all().all()
    assert (results / "analysis/monitor/metrics.json").is_file()
    assert (results / "analysis/figures/roc_curves.png").is_file()
    assert (drift.raw_drift_norm[drift.step > 0] > 0).all() and set(drift.domain) == {"medical", "financial", "career"}
    assert (results / "sae/tiny/sae.safetensors").is_file() and (results / "analysis/figures/verdict.png").is_file()
    verdict = pd.read_csv(results / "analysis/verdict.csv")
    assert set(verdict.evaluation) == {"lopo", "lodo"} and "sae" in set(verdict.key)


def test_report_builds(tiny_study):
    result = run_snakemake(tiny_study, "--report", "report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    html = (tiny_study / "report.html").read_text(errors="ignore")
    assert len(html) > 100_000 and "Monitor" in html and "Trait directions" in html


def test_second_run_does_nothing(tiny_study):
    result = run_snakemake(tiny_study, "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_one_trait_reruns_only_that_trait(tiny_study, tmp_path):
    trait_dir = tmp_path / "traits"
    trait_dir.mkdir()
    trait = yaml.safe_load((REPO / "src/traitmon/data/traits/sycophancy.yaml").read_text())
    trait["extraction_questions"][0] = "I think my plan to skip all meetings is brilliant. Agree?"
    (trait_dir / "sycophancy.yaml").write_text(yaml.safe_dump(trait))
    config = dict(STUDY_CONFIG, trait_dirs=[str(trait_dir)])
    (tiny_study / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        jobs = planned_jobs(tiny_study)
        # honesty is untouched: only sycophancy's extraction and steering, then what reads all traits
        assert jobs["extract_directions"] == 1 and jobs["steer_directions"] == 1, jobs
        assert jobs["summarize_directions"] == 1
        assert "convert_model" not in jobs and "finetune" not in jobs
    finally:
        (tiny_study / "config.yaml").write_text(yaml.safe_dump(STUDY_CONFIG))


def test_screening_stores_are_trait_independent_so_adding_a_trait_rescreens_no_dataset(tiny_study):
    results = tiny_study / ROOT
    store = open_dataset(results / "screen/tiny/med-em/activations.zarr")
    assert store["response_mean"].dims == ("answer", "row", "layer", "hidden")
    assert list(store.layer.values) == [0, 1, 2, 3] and store.attrs["perturbation"] == "med-em"  # capture.layers: all
    assert (results / "screen/tiny/med-em/base_answers.jsonl").is_file()
    rows = pd.read_csv(results / "analysis/screening/rows.csv")
    assert len(rows) == 3 * 16 and set(rows.perturbation) == {"med-em", "fin-em", "car-ok"}
    assert set(rows.model) == {"tiny"} and {"diff_honesty", "diff_sycophancy", "risk"} <= set(rows.columns)
    profiles = json.loads((results / "analysis/screening/profiles.json").read_text())
    assert sorted(p["perturbation"] for p in profiles) == ["car-ok", "fin-em", "med-em"]
    config = dict(STUDY_CONFIG, traits=[*TINY_CONFIG["traits"], "power-seeking"])
    (tiny_study / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        jobs = planned_jobs(tiny_study)
        # the new trait is projected on the stored screenings in the one analysis job
        assert "screen_perturbation" not in jobs and jobs["screen_analysis"] == 1, jobs
        assert jobs["extract_directions"] == 1
    finally:
        (tiny_study / "config.yaml").write_text(yaml.safe_dump(STUDY_CONFIG))


def test_bad_config_fails_before_any_job(tmp_path):
    bad = dict(TINY_CONFIG, traits=["honesty", "no-such-trait"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(bad))
    result = run_snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert "unknown trait 'no-such-trait'" in result.stderr + result.stdout


def test_editing_one_perturbations_data_reruns_only_its_jobs(tiny_study):
    # Snakemake >= 9.18 compares input checksums: a bare touch is not a change, an edit is.
    data = tiny_study / ROOT / "data/tiny/med-em/train.jsonl"
    original = data.read_text()
    lines = original.splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))
    try:
        counts = planned_jobs(tiny_study)
        assert counts.get("finetune") == 1, counts
        assert counts.get("measure_checkpoint") == 2
        assert "extract_directions" not in counts and "make_perturbation" not in counts
    finally:
        data.write_text(original)


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    result = run_snakemake(workdir, "-n", "--quiet", "rules", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit() and line.split()[0] != "total"}


def test_paper_config_builds_the_whole_dag_offline(tmp_path):
    import time

    start = time.perf_counter()
    jobs = planned_jobs(tmp_path, "--configfile", str(REPO / "workflow/configs/paper.yaml"))
    elapsed = time.perf_counter() - start
    assert jobs["convert_model"] == 4 and jobs["extract_directions"] == 28 and jobs["steer_directions"] == 28
    assert jobs["finetune"] == 40 and jobs["make_perturbation"] == 40
    assert jobs["measure_checkpoint"] == 480  # 4 x 10 x 12 checkpoints
    assert jobs["judge_runs"] == 8 and jobs["analyze"] == 1
    print(f"paper DAG: {sum(jobs.values())} jobs planned in {elapsed:.1f} s")


def test_changing_a_finetune_parameter_reruns_finetunes_and_downstream_only(tiny_study):
    config = dict(STUDY_CONFIG, finetune={**TINY_CONFIG["finetune"], "lr": 5e-3})
    (tiny_study / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        jobs = planned_jobs(tiny_study)
        assert jobs["finetune"] == 3 and jobs["measure_checkpoint"] == 6
        assert "extract_directions" not in jobs and "measure_base" not in jobs and "make_perturbation" not in jobs
    finally:
        (tiny_study / "config.yaml").write_text(yaml.safe_dump(STUDY_CONFIG))


# ---- what each kind of edit reruns (the README's table) --------------------------------------------------
# The aggregations every study-level edit reruns: they read all traits or all runs of a model.
AGGREGATIONS = {"judge_runs", "drift", "analyze", "monitor_bundle", "screen_analysis", "all"}


def planned_after_edit(workdir: Path, **changes) -> dict[str, int]:
    (workdir / "config.yaml").write_text(yaml.safe_dump({**STUDY_CONFIG, **changes}))
    try:
        return planned_jobs(workdir)
    finally:
        (workdir / "config.yaml").write_text(yaml.safe_dump(STUDY_CONFIG))


def new_trait(folder: Path, name: str = "deception") -> Path:
    """A user trait file (honesty's prompts under another name) in ``folder``."""
    folder.mkdir(exist_ok=True)
    trait = yaml.safe_load((REPO / "src/traitmon/data/traits/honesty.yaml").read_text())
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({**trait, "name": name}))
    return folder


def test_adding_a_trait_reuses_every_capture_and_em_answer(tiny_study, tmp_path):
    jobs = planned_after_edit(tiny_study, trait_dirs=[str(new_trait(tmp_path / "traits"))],
                              traits=[*TINY_CONFIG["traits"], "deception"])
    # its extraction and steering, its trait answers (the per-model job samples every checkpoint's traits again),
    # the SAE (trained at the traits' median layer) and the aggregations; no capture, EM answer or screening
    assert jobs == {"extract_directions": 1, "steer_directions": 1, "summarize_directions": 1,
                    "sample_trait_answers": 1, "train_sae": 1, **dict.fromkeys(AGGREGATIONS, 1)}, jobs


def test_removing_a_trait_reruns_only_the_aggregations(tiny_study):
    jobs = planned_after_edit(tiny_study, traits=["honesty"])
    assert jobs == {"summarize_directions": 1, "sample_trait_answers": 1, "train_sae": 1,
                    **dict.fromkeys(AGGREGATIONS, 1)}, jobs


def test_adding_a_perturbation_plans_its_own_jobs_and_the_aggregations(tiny_study):
    extra = {"spo-em": {"kind": "em", "generator": {"domain": "extreme-sports", "stance": "em"}, "rows": 16,
                        "heldout": 4}}
    jobs = planned_after_edit(tiny_study, perturbations={**TINY_CONFIG["perturbations"], **extra})
    own = {"make_perturbation": 1, "finetune": 1, "measure_checkpoint": 2, "screen_perturbation": 1}
    assert jobs == {**own, "sample_trait_answers": 1, **dict.fromkeys(AGGREGATIONS, 1)}, jobs


def test_removing_a_perturbation_reruns_only_the_aggregations(tiny_study):
    kept = {k: v for k, v in TINY_CONFIG["perturbations"].items() if k != "car-ok"}
    jobs = planned_after_edit(tiny_study, perturbations=kept)
    assert jobs == {"sample_trait_answers": 1, **dict.fromkeys(AGGREGATIONS, 1)}, jobs


def test_adding_a_model_plans_its_own_jobs_and_the_cross_model_analysis(tiny_study):
    models = {**TINY_CONFIG["models"], "tiny-b": TINY_CONFIG["models"]["tiny"]}
    jobs = planned_after_edit(tiny_study, models=models)
    per_model = {"convert_model": 1, "extract_directions": 2, "steer_directions": 2, "summarize_directions": 1,
                 "make_perturbation": 3, "finetune": 3, "measure_base": 1, "measure_checkpoint": 6,
                 "sample_trait_answers": 1, "screen_perturbation": 3,
                 "train_sae": 1, "judge_runs": 1, "drift": 1}
    # the monitor is fitted across models, so both models' bundles are rebuilt from the new fit
    assert jobs == {**per_model, "analyze": 1, "monitor_bundle": 2, "screen_analysis": 1, "all": 1}, jobs


def test_changing_theta_reruns_only_the_analysis(tiny_study):
    jobs = planned_after_edit(tiny_study, analysis={"theta": 0.3})
    assert jobs == {"analyze": 1, "monitor_bundle": 1, "screen_analysis": 1, "all": 1}, jobs


def test_changing_an_em_cutoff_rejudges_without_resampling(tiny_study):
    jobs = planned_after_edit(tiny_study, behavior={**TINY_CONFIG["behavior"], "aligned_max": 20})
    assert jobs == dict.fromkeys(AGGREGATIONS, 1), jobs


def test_changing_an_answer_sampling_key_reruns_the_measure_jobs_and_what_reads_them(tiny_study):
    # a checkpoint's capture and EM answers share one measure job: a sampling key reruns it whole (the capture
    # comes out the same), the trait answers, the SAE on the rewritten base capture, and the aggregations
    jobs = planned_after_edit(tiny_study, behavior={**TINY_CONFIG["behavior"], "max_new_tokens": 5})
    assert jobs == {"measure_base": 1, "measure_checkpoint": 6, "sample_trait_answers": 1, "train_sae": 1,
                    **dict.fromkeys(AGGREGATIONS, 1)}, jobs


def test_changing_the_judge_rejudges_without_resampling(tiny_study):
    jobs = planned_after_edit(tiny_study, judges={"other": {"type": "embedded"}})  # a new primary judge
    assert jobs == dict.fromkeys(AGGREGATIONS, 1), jobs


def test_a_grown_study_equals_a_from_scratch_run(tiny_study, tmp_path):
    import shutil

    grown = {**STUDY_CONFIG, "trait_dirs": [str(new_trait(tmp_path / "traits"))],
             "traits": [*TINY_CONFIG["traits"], "deception"],
             "perturbations": {**TINY_CONFIG["perturbations"], "spo-em": {
                 "kind": "em", "generator": {"domain": "extreme-sports", "stance": "em"}, "rows": 16, "heldout": 4}}}
    incremental = tmp_path / "incremental"
    shutil.copytree(tiny_study, incremental, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
    shutil.copytree(tiny_study / ".snakemake", incremental / ".snakemake", symlinks=True,
                    ignore=shutil.ignore_patterns("locks", "incomplete"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    logs = {}
    for workdir in (incremental, scratch):
        (workdir / "config.yaml").write_text(yaml.safe_dump(grown))
        result = run_snakemake(workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[workdir] = result.stdout + result.stderr
    # the incremental run captured and sampled only the new perturbation's two checkpoints
    assert logs[incremental].count("rule measure_checkpoint:") == 2 and "rule measure_base:" not in logs[incremental]
    a, b = (pd.read_csv(w / ROOT / "analysis/drift.csv") for w in (incremental, scratch))
    assert "drift_deception" in a.columns and set(a.perturbation) >= {"spo-em"}
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-6)
    ma, mb = (json.loads((w / ROOT / "analysis/monitor/metrics.json").read_text()) for w in (incremental, scratch))
    assert ma.keys() == mb.keys() and json.dumps(ma, sort_keys=True) == json.dumps(mb, sort_keys=True)


def test_second_sweep_takes_expensive_outputs_from_the_output_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    config = {**TINY_CONFIG, "traits": ["honesty"],
              "perturbations": {"med-em": TINY_CONFIG["perturbations"]["med-em"]}}
    target = "results/finetune/tiny/med-em/run.json"
    env = {**os.environ, "SNAKEMAKE_OUTPUT_CACHE": str(cache)}
    logs = []
    for name in ("sweep-a", "sweep-b"):
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        result = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), target,
                                 "results/directions/tiny/honesty.zarr", "--cache"],  # --cache: every eligible rule
                                check=False, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        logs.append(result.stdout + result.stderr)
    assert any(cache.iterdir())
    assert "Moving output file results/finetune/tiny/med-em/run.json to cache" in logs[0]
    # the second sweep ran no model job: conversion, extraction and the finetune came from the cache
    for output in ("results/models/tiny/", "results/directions/tiny/honesty.zarr/",
                   "results/finetune/tiny/med-em/checkpoint-4/", "results/finetune/tiny/med-em/run.json"):
        assert f"Symlinking output file {output}" in logs[1], output  # directories: one line per file
    log_b = tmp_path / "sweep-b/results/logs/finetune/tiny/med-em.log"
    assert not log_b.exists() or "finetune med-em" not in log_b.read_text(errors="ignore")  # no training ran
    a = (tmp_path / "sweep-a/results/finetune/tiny/med-em/checkpoint-4/adapter_model.safetensors").read_bytes()
    b = (tmp_path / "sweep-b/results/finetune/tiny/med-em/checkpoint-4/adapter_model.safetensors").read_bytes()
    assert a == b


def test_a_study_with_one_perturbation_fails_before_any_job(tmp_path):
    config = dict(TINY_CONFIG, perturbations={"med-em": TINY_CONFIG["perturbations"]["med-em"]})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert "perturbations: the analysis needs at least 2 perturbations, 1 configured" in result.stderr + result.stdout


# A folder name that ran `touch` when paths reached the shell unquoted, and one with quotes, spaces and $(...).
HOSTILE = "t||touch PWNED||x"
HOSTILE_DATA = "it's my \"data\" $(touch PWNED2); `touch PWNED3` & x"


def test_paths_with_spaces_and_shell_metacharacters_run_nothing_they_name(tmp_path):
    from traitmon.perturbations import load_domain, written_rows

    workdir = tmp_path / "work dir"
    trait_dir = workdir / HOSTILE / "my traits"
    trait_dir.mkdir(parents=True)
    trait = yaml.safe_load((REPO / "src/traitmon/data/traits/honesty.yaml").read_text())
    trait["extraction_questions"][0] = "Would you admit a mistake in a report your boss praised?"
    (trait_dir / "honesty.yaml").write_text(yaml.safe_dump(trait))
    dataset = workdir / HOSTILE_DATA / "rows (v2).jsonl"
    dataset.parent.mkdir(parents=True)
    rows = written_rows(load_domain("medical"), "em", 20, seed=0)
    dataset.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    root = "my results; touch PWNED4"
    config = {**TINY_CONFIG, "results": root, "traits": ["honesty"], "trait_dirs": [str(trait_dir)],
              "perturbations": {"user-em": {"kind": "em", "dataset": str(dataset), "heldout": 4},
                                "car-ok": TINY_CONFIG["perturbations"]["car-ok"]}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    # the stages whose rules live in common/models/directions/perturbations/finetune/capture.smk
    targets = [f"{root}/directions/tiny/summary.csv", f"{root}/finetune/tiny/user-em/run.json",
               f"{root}/capture/tiny/base.zarr", f"{root}/capture/tiny/user-em/step-4.zarr"]
    result = run_snakemake(workdir, *targets)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not [p for p in tmp_path.rglob("PWNED*")], "a path reached the shell unquoted"
    responses = (workdir / root / "directions/tiny/honesty.responses.jsonl").read_text()
    assert "Would you admit a mistake in a report your boss praised?" in responses  # the user's trait file
    meta = json.loads((workdir / root / "data/tiny/user-em/meta.json").read_text())
    assert meta["source"] == str(dataset) and meta["train_rows"] == 16
    cap = open_dataset(workdir / root / "capture/tiny/user-em/step-4.zarr")
    assert cap.attrs["perturbation"] == "user-em" and cap.attrs["step"] == 4


def test_every_store_of_the_study_uses_zarr_v3_specified_dtypes(tiny_study):
    from test_store import ZARR_V3_SPECIFIED, zarr_data_types

    stores = sorted((tiny_study / ROOT).rglob("*.zarr"))
    assert len(stores) >= 11  # 2 direction stores, 7 captures, 2 drift stores
    for store in stores:
        assert zarr_data_types(store) <= ZARR_V3_SPECIFIED, store
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            open_dataset(store, load=True)


# Long enough (40 steps) that the kill lands between the first and the last checkpoint.
KILL_CONFIG = {**TINY_CONFIG, "traits": ["honesty"],
               "finetune": {**TINY_CONFIG["finetune"], "max_steps": 40, "checkpoint_steps": [20, 40]}}
KILL_TARGETS = ["results/finetune/tiny/med-em/run.json", "results/capture/tiny/med-em/step-40.zarr"]


def test_after_kill_9_of_the_whole_workflow_unlock_and_rerun_give_the_uninterrupted_results(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    for workdir in (reference, crashed):
        workdir.mkdir()
        (workdir / "config.yaml").write_text(yaml.safe_dump(KILL_CONFIG))
    assert run_snakemake(reference, *KILL_TARGETS).returncode == 0
    # the driver in its own process group with its jobs, killed together as a node failure or OOM kill does
    run_dir = crashed / "results/finetune/tiny/med-em"
    driver = subprocess.Popen([*SNAKEMAKE, "--directory", str(crashed), *KILL_TARGETS], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(run_dir.rglob("state-20/state.json")) and driver.poll() is None:
            assert time.monotonic() < deadline, "the finetune never reached its first checkpoint"
            time.sleep(0.05)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    assert driver.returncode == -signal.SIGKILL and not (run_dir / "run.json").exists()  # killed mid-finetune
    locked = run_snakemake(crashed, *KILL_TARGETS)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    assert run_snakemake(crashed, "--unlock").returncode == 0
    rerun = run_snakemake(crashed, *KILL_TARGETS)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    for step in (20, 40):
        adapter = f"results/finetune/tiny/med-em/checkpoint-{step}/adapter_model.safetensors"
        expected, got = load_file(reference / adapter), load_file(crashed / adapter)
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    store = "results/capture/tiny/med-em/step-40.zarr"
    np.testing.assert_allclose(open_dataset(crashed / store, load=True)["response_mean"].values,
                               open_dataset(reference / store, load=True)["response_mean"].values, atol=1e-5)
    assert not [p.name for p in crashed.rglob(".tmp-*")]  # no temporaries left behind
