"""The whole DAG killed with SIGKILL at random moments, resumed each time with the same command, ends
with the same artifacts, byte for byte, as a run that was never interrupted.

The kill moments come from a seeded generator; the seed and the delays are printed, and
LETI_CRASH_SEED replays a failure (LETI_CRASH_KILLS sets how many kills, 5 by default)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_pipeline_config

from leti.analysis.report import artifact_kind
from leti.io import read_json, read_jsonl
from leti.records import GenerationProbe, Metrics, Probe

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("LETI_CRASH_SEED", "20261202"))
KILLS = int(os.environ.get("LETI_CRASH_KILLS", "5"))
# Fields that are timings, not results: the same run measures them differently every time.
TIMINGS = {"executions.jsonl": "duration_s", "train_log.jsonl": "tokens_per_s"}
# What `make run` runs: Snakemake behind the stale-lock check.
COMMAND = [
    str(Path(sys.executable).with_name("leti")),
    "snakemake",
    "--snakefile",
    str(REPO / "Snakefile"),
    "--cores",
    "2",
]


def digest(path: Path) -> str:
    """sha256 of the file; of its records without their timing field for executions and train logs."""
    if path.name not in TIMINGS:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop(TIMINGS[path.name])
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def artifact_digests(folder: Path) -> dict[str, str]:
    """Every file under results/ and resources/ (logs and benchmarks hold timings)."""
    return {
        str(path.relative_to(folder)): digest(path)
        for top in ("results", "resources")
        for path in sorted((folder / top).rglob("*"))
        if path.is_file()
    }


def assert_artifacts_whole(folder: Path) -> None:
    """Every record file under results/ parses whole: none stands half-written where a rule's output goes."""
    for path in (folder / "results").rglob("*"):
        if path.name == "metrics.json":
            read_json(path, Metrics)
        elif path.name == "probe.json":
            read_json(path, Probe)
        elif path.name == "generation.json":
            read_json(path, GenerationProbe)
        elif path.suffix == ".jsonl" and "adapter" not in path.parts:
            read_jsonl(path, artifact_kind(path))


def run(folder: Path, timeout: float | None = None) -> subprocess.Popen:
    process = subprocess.Popen(
        COMMAND,
        cwd=folder,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return process


def workflow(folder: Path, mbpp_path: Path, model: Path) -> Path:
    folder.mkdir()
    config = tiny_pipeline_config(mbpp_path, model, iterations=1)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_killing_the_whole_dag_at_random_moments_changes_no_artifact(
    tmp_path: Path, mbpp_path: Path, tiny_raw_model: Path
) -> None:
    reference = workflow(tmp_path / "reference", mbpp_path, tiny_raw_model)
    started = time.monotonic()
    uninterrupted = run(reference)
    duration = time.monotonic() - started
    assert uninterrupted.returncode == 0, uninterrupted.stderr.read()[-3000:]
    expected = artifact_digests(reference)
    assert any(name.endswith("adapter_model.safetensors") for name in expected)

    crashed = workflow(tmp_path / "crashed", mbpp_path, tiny_raw_model)
    rng = random.Random(SEED)
    delays = []
    while len(delays) < KILLS:
        delay = rng.uniform(1.0, duration / (KILLS + 1))
        process = run(crashed, timeout=delay)
        if process.returncode != -signal.SIGKILL:
            break  # it finished before the kill
        delays.append(round(delay, 2))
        assert_artifacts_whole(crashed)
    print(f"LETI_CRASH_SEED={SEED}: killed after {delays} s (the uninterrupted run took {duration:.0f} s)")
    assert len(delays) == KILLS, f"the run ended before kill {len(delays) + 1}"
    resumed = run(crashed)
    assert resumed.returncode == 0, resumed.stderr.read()[-3000:]

    found = artifact_digests(crashed)
    assert sorted(found) == sorted(expected)
    differing = [name for name in expected if found[name] != expected[name]]
    assert not differing, f"not byte-identical after the kills (LETI_CRASH_SEED={SEED}): {differing}"
