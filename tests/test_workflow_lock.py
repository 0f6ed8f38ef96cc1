"""`leti snakemake` (what `make run` runs) after a Snakemake was killed with SIGKILL: it removes the
lock that Snakemake left, and never one that a live Snakemake holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LETI = str(Path(sys.executable).with_name("leti"))
SNAKEFILE = """
rule all:
    output: "done.txt"
    params: seconds=config.get("seconds", 60)
    shell: "sleep {params.seconds} && touch {output}"
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    return tmp_path


def start(folder: Path, *args: str) -> subprocess.Popen:
    """`leti snakemake` in the background, in a process group of its own; returns once it holds the lock."""
    process = subprocess.Popen(
        [LETI, "snakemake", "--cores", "1", *args], cwd=folder, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any((folder / ".snakemake" / "locks").glob("*.lock")):
        assert process.poll() is None and time.monotonic() < deadline, "Snakemake did not start"
        time.sleep(0.1)
    return process


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def rerun(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LETI, "snakemake", "--cores", "1", "--config", "seconds=0", *args],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_lock_of_a_killed_snakemake_is_removed_and_the_run_resumes(folder: Path) -> None:
    kill_group(start(folder))
    assert any((folder / ".snakemake" / "locks").glob("*.lock"))
    resumed = rerun(folder)
    assert resumed.returncode == 0, resumed.stderr
    assert "removing the lock of a Snakemake that is gone" in resumed.stderr
    assert (folder / "done.txt").is_file()
    assert not any((folder / ".snakemake" / "locks").glob("*.lock"))


def test_a_live_snakemake_keeps_its_lock(folder: Path) -> None:
    running = start(folder)
    try:
        refused = rerun(folder)
        assert refused.returncode == 1
        assert f"Snakemake {running.pid} is running here; wait for it or stop it" in refused.stderr
        assert running.poll() is None and any((folder / ".snakemake" / "locks").glob("*.lock"))
        # A Snakemake started by hand, not through leti, is found by its process too.
        (folder / ".snakemake" / "leti-owner.json").unlink()
        assert f"Snakemake {running.pid} is running here" in rerun(folder).stderr
    finally:
        kill_group(running)


def test_a_lock_it_cannot_judge_is_named_with_the_command_that_removes_it(folder: Path) -> None:
    kill_group(start(folder))
    # As if this Snakemake had run on another host of a cluster.
    owner = folder / ".snakemake" / "leti-owner.json"
    owner.write_text(json.dumps({**json.loads(owner.read_text()), "host": "elsewhere"}))
    refused = rerun(folder)
    assert refused.returncode == 1 and not (folder / "done.txt").exists()
    line = " ".join(refused.stderr.split())
    assert "is locked by host elsewhere; if no Snakemake runs there any more, run:" in line
    assert "snakemake --cores 1 --config seconds=0 --unlock" in line
