"""The SLURM profile against a real one-node SLURM started by the test (Debian's slurm-wlm + munge)."""

import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import REPO, TINY_SOURCE
from slurm_cluster import missing_reason, slurm_cluster
from traitmon.store import open_dataset

pytestmark = pytest.mark.slurm
reason = missing_reason()

CONFIG = {
    "models": {"tiny": {"source": TINY_SOURCE, "params_b": 0.001}},
    "traits": ["honesty"],
    "directions": {"questions": 6, "max_new_tokens": 6, "batch_size": 12, "temperature": 1.0},  # seeded
    "steering": {"coefs": [-1.0, 0.0, 1.0], "questions": 2, "max_new_tokens": 4},
    "resources": {"threads": 1, "mem_mb_base": 1000, "mem_mb_per_b_params": 0, "runtime_base": 10},
}
TARGET = "results/directions/tiny/summary.csv"


def snakemake(workdir, *args):
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(workdir), TARGET, *args], check=False, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(reason is not None, reason=reason or "")
def test_profile_runs_jobs_through_sbatch_and_matches_a_local_run(tmp_path):
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    for folder in (local, cluster):
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    result = snakemake(local, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]

    with slurm_cluster(tmp_path / "slurm") as partition:
        result = snakemake(cluster, "--profile", str(REPO / "workflow/profiles/slurm"), "--workflow-profile", "none",
                           "--slurm-no-account", "--slurm-status-command", "squeue",
                           "--default-resources", f"slurm_partition={partition}", "runtime=10", "mem_mb=1000",
                           "--slurm-keep-successful-logs", "--latency-wait", "5",
                           "--slurm-init-seconds-before-status-checks", "1", "--jobs", "2",
                           # this test cluster has no GPU: replace the profile's per-rule gpu: 1
                           "--set-resources", "extract_directions:gpu=0", "steer_directions:gpu=0")
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:]
    # every job went through sbatch: the plugin reports SLURM job ids and keeps their SLURM logs
    assert "SLURM run ID" in log or "SLURM jobid" in log or "external jobid" in log.lower(), log[-3000:]
    slurm_logs = list((cluster / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert len(slurm_logs) >= 4, slurm_logs  # convert, extract, steer, summarize
    ours = open_dataset(cluster / "results/directions/tiny/honesty.zarr", load=True)
    theirs = open_dataset(local / "results/directions/tiny/honesty.zarr", load=True)
    np.testing.assert_allclose(ours["direction"].values, theirs["direction"].values, atol=1e-5)
    assert ours.attrs["chosen_layer"] == theirs.attrs["chosen_layer"]
    assert (cluster / TARGET).read_text() == (local / TARGET).read_text()
