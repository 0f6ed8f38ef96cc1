"""bench/gpu_smoke.sh in its CPU mode, so that the GPU smoke check cannot rot between GPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from gpu_smoke import CHECKS


@pytest.mark.slow
def test_the_gpu_smoke_check_runs_every_check_in_cpu_mode(mbpp_path: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ["PATH"]]),
        "LETI_MBPP_PATH": str(mbpp_path),
    }
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_smoke.sh"), "--cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [
        line.split(" | ")
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    assert [row[0].removeprefix("| ") for row in rows[1:]] == list(CHECKS)
    assert all(row[1] == "ok" for row in rows[1:]), result.stdout
