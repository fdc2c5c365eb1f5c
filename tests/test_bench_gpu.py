"""bench/gpu.sh runs end to end on CPU with a tiny shape, without zarr, snakemake or gguf importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_bench_runs_on_cpu_with_a_tiny_shape_and_no_workflow_packages(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("zarr", "snakemake", "gguf", "xarray"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--shape", "tiny", "--device", "cpu",
                           "--dtype", "float32"], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"device"')))
    for key in ("capture_vs_plain_forward", "sampling_vs_plain_generate", "live_check_in_steps"):
        assert result[key] > 0
    assert "traitmon overhead vs plain peft" in done.stdout
