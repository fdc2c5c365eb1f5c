"""The workflow itself, on a tiny random Llama: the DAG runs, outputs have the promised shape, a rerun
does nothing, and a bad config stops before any job with a readable message."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, TINY_SOURCE
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
                 "grad_accum": 1, "max_length": 384, "precision": "fp32"},
    "capture": {"per_trait_questions": 1, "batch_size": 32},
    "behavior": {"samples_per_question": 1, "trait_questions": 1, "max_new_tokens": 6, "batch_size": 32},
    "resources": {"threads": 1},
}


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    result = run_snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_direction_stage_outputs(tiny_study):
    results = tiny_study / "results"
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
    results = tiny_study / "results"
    for pert in ("med-em", "fin-em", "car-ok"):
        for step in (2, 4):
            assert (results / f"finetune/tiny/{pert}/checkpoint-{step}/adapter_model.safetensors").is_file()
            cap = open_dataset(results / f"capture/tiny/{pert}/step-{step}.zarr")
            assert cap["response_mean"].dims == ("prompt", "layer", "hidden")
            assert cap.attrs["step"] == step and cap.attrs["perturbation"] == pert
    assert (results / "data/tiny/med-em/meta.json").is_file()
    scores = pd.read_csv(results / "behavior/embedded/tiny/em_scores.csv")
    assert set(scores.step) == {0, 2, 4} and len(scores) == 9
    drift = pd.read_csv(results / "analysis/drift.csv")
    assert {"model", "perturbation", "step", "em_rate", "drift_honesty", "drift_sycophancy"} <= set(drift.columns)
    assert (drift[drift.step == 0][["drift_honesty", "drift_sycophancy"]].abs() < 1e-6).all().all()
    assert (results / "analysis/monitor/metrics.json").is_file()
    assert (results / "analysis/figures/roc_curves.png").is_file()


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
    config = dict(TINY_CONFIG, trait_dirs=[str(trait_dir)])
    (tiny_study / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        jobs = planned_jobs(tiny_study)
        # honesty is untouched: only sycophancy's extraction and steering, then what reads all traits
        assert jobs["extract_directions"] == 1 and jobs["steer_directions"] == 1, jobs
        assert jobs["summarize_directions"] == 1
        assert "convert_model" not in jobs and "finetune" not in jobs
    finally:
        (tiny_study / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))


def test_bad_config_fails_before_any_job(tmp_path):
    bad = dict(TINY_CONFIG, traits=["honesty", "no-such-trait"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(bad))
    result = run_snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert "unknown trait 'no-such-trait'" in result.stderr + result.stdout


def test_editing_one_perturbations_data_reruns_only_its_jobs(tiny_study):
    # Snakemake >= 9.18 compares input checksums: a bare touch is not a change, an edit is.
    data = tiny_study / "results/data/tiny/med-em/train.jsonl"
    original = data.read_text()
    lines = original.splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))
    try:
        counts = planned_jobs(tiny_study)
        assert counts.get("finetune") == 1, counts
        assert counts.get("capture_checkpoint") == 2 and counts.get("sample_answers") == 2
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
    assert jobs["capture_checkpoint"] == 480 and jobs["sample_answers"] == 480  # 4 x 10 x 12 checkpoints
    assert jobs["judge_runs"] == 8 and jobs["analyze"] == 1
    print(f"paper DAG: {sum(jobs.values())} jobs planned in {elapsed:.1f} s")


def test_changing_a_finetune_parameter_reruns_finetunes_and_downstream_only(tiny_study):
    config = dict(TINY_CONFIG, finetune={**TINY_CONFIG["finetune"], "lr": 5e-3})
    (tiny_study / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        jobs = planned_jobs(tiny_study)
        assert jobs["finetune"] == 3 and jobs["capture_checkpoint"] == 6
        assert "extract_directions" not in jobs and "capture_base" not in jobs and "make_perturbation" not in jobs
    finally:
        (tiny_study / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))


def test_adding_a_perturbation_runs_only_its_jobs(tiny_study):
    extra = {"spo-em": {"kind": "em", "generator": {"domain": "extreme-sports", "stance": "em"}, "rows": 16,
                        "heldout": 4}}
    config = dict(TINY_CONFIG, perturbations={**TINY_CONFIG["perturbations"], **extra})
    (tiny_study / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        jobs = planned_jobs(tiny_study)
        assert jobs["make_perturbation"] == 1 and jobs["finetune"] == 1 and jobs["capture_checkpoint"] == 2
        assert jobs["sample_answers"] == 2 and "capture_base" not in jobs and "convert_model" not in jobs
    finally:
        (tiny_study / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))


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
                                capture_output=True, text=True, timeout=600, env=env)
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
