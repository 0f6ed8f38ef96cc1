"""The tiny pipeline through a real SLURM: every job goes through sbatch, a killed job is retried,
and after a failed job, rerunning Snakemake runs only what is unfinished.

tests/services/slurm.sh brings up a one-node cluster on 127.0.0.1 (or finds one running); a
cluster that cannot be brought up fails the test with the script's message.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from leti.config import BUILTIN_RESOURCES
from leti.io import read_json, read_jsonl
from leti.records import Execution, FeedbackExample, Metrics, Problem, Sample, TrainStep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SETUP = REPO / "tests" / "services" / "slurm.sh"
ARMS = ("textual", "binary")
EVAL_SETS = ("mbpp/test", "humaneval/test")
# The job this test kills: both attempts of it, so that the run fails and must be resumed.
KILLED_COMMENT = "rule_finetune_wildcards_textual_1"
KILLED_LOG = "logs/finetune/textual/iter1.log"
# What the plugin logs for every job it submits.
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")
RUN_ID = re.compile(r"SLURM run ID: (\S+)")
RUN_TIMEOUT_S = 1800

# Small jobs, so that two run side by side on the test cluster's two CPUs.
SMALL_JOB = {"threads": 1, "mem_mb": 1000, "runtime": 20}
# The test cluster: its partition, no account, and quick polling of a small local queue.
CLUSTER_OVERRIDES = (
    "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=20",
    "--slurm-init-seconds-before-status-checks", "2",
    "--seconds-between-status-checks", "2",
    "--latency-wait", "5",
    "--slurm-keep-successful-logs",
)  # fmt: skip


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """A running SLURM; never skipped: a cluster that cannot come up is a failure."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.fail("snakemake-executor-plugin-slurm is not installed in this environment", pytrace=False)
    try:
        setup = subprocess.run(
            ["bash", str(CLUSTER_SETUP)], capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{CLUSTER_SETUP} did not finish in {error.timeout}s", pytrace=False)
    if setup.returncode != 0:
        pytest.fail(f"{CLUSTER_SETUP} failed:\n{setup.stdout}{setup.stderr}", pytrace=False)


@pytest.fixture
def slurm_workflow(tiny_workflow: Path) -> Path:
    """The tiny workflow for one iteration, with jobs small enough for the test cluster."""
    config_path = tiny_workflow / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["iterations"] = 1
    config["device"] = "cpu"
    # Every rule with a built-in size (the others take `default`'s).
    config["resources"] = {rule: dict(SMALL_JOB) for rule in BUILTIN_RESOURCES}
    config_path.write_text(yaml.safe_dump(config))
    return tiny_workflow


def environment() -> dict[str, str]:
    """This environment's bin folder first on PATH: the jobs inherit it (sbatch --export=ALL) and call `leti`."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def snakemake_command(*args: str) -> list[str]:
    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    return [
        snakemake,
        "--snakefile", str(REPO / "Snakefile"),
        "--profile", str(REPO / "profiles" / "slurm"),
        *CLUSTER_OVERRIDES,
        *args,
    ]  # fmt: skip


def planned_jobs(workdir: Path) -> Counter[str]:
    """What a dry run would run, as "rule output" strings, one per job."""
    plan = subprocess.run(
        snakemake_command("--dry-run"),
        cwd=workdir,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs, rule = Counter(), None
    for line in plan.stdout.splitlines():
        if match := re.fullmatch(r"(?:local)?rule (\w+):", line):
            rule = match.group(1)
        elif rule and (match := re.fullmatch(r"    output: (.*)", line)):
            jobs[f"{rule} {match.group(1)}"] += 1
            rule = None
    return jobs


def squeue_jobs(run_id: str) -> dict[str, tuple[str, str]]:
    """SLURM job id -> (comment, state) of every job of one Snakemake run, finished ones too."""
    result = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%k|%T", "--name", run_id],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    jobs = {}
    for line in result.stdout.splitlines():
        job_id, comment, state = line.strip().split("|")
        jobs[job_id] = (comment, state)
    return jobs


class Run:
    """One `snakemake --profile profiles/slurm` in the background, its log in a file."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.log_path = workdir / f"{name}.snakemake.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            snakemake_command(), cwd=workdir, env=environment(), stdout=self._log, stderr=subprocess.STDOUT
        )
        self.deadline = time.monotonic() + RUN_TIMEOUT_S

    def text(self) -> str:
        return self.log_path.read_text()

    def run_id(self) -> str | None:
        match = RUN_ID.search(self.text())
        return match.group(1) if match else None

    def submitted(self) -> list[str]:
        """The SLURM job ids the plugin reports having submitted through sbatch."""
        return [match.group(2) for match in SUBMITTED.finditer(self.text())]

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise AssertionError(f"snakemake ran longer than {RUN_TIMEOUT_S}s:\n{self.text()[-5000:]}")
        if self.process.poll() is not None:
            raise AssertionError(f"snakemake ended early ({self.process.returncode}):\n{self.text()[-5000:]}")

    def wait(self) -> int:
        try:
            returncode = self.process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"snakemake ran longer than {RUN_TIMEOUT_S}s:\n{self.text()[-5000:]}"
            ) from None
        self._log.close()
        return returncode

    def stop(self) -> None:
        """Stop this run and its SLURM jobs, if a failed assertion left them running."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if run_id := self.run_id():
            subprocess.run(["scancel", "--name", run_id], check=False)
        self._log.close()


def kill_when_running(run: Run, workdir: Path, not_before: float, skip: set[str]) -> str:
    """scancel the job KILLED_COMMENT once its command has started (its log was written after
    `not_before`), and return its SLURM job id. Jobs in `skip` were killed already."""
    log = workdir / KILLED_LOG
    while True:
        run.check_time()
        run_id = run.run_id()
        if run_id:
            for job_id, (comment, state) in squeue_jobs(run_id).items():
                started = log.exists() and log.stat().st_mtime > not_before
                if comment == KILLED_COMMENT and state == "RUNNING" and job_id not in skip and started:
                    subprocess.run(["scancel", job_id], check=True)
                    return job_id
        time.sleep(0.3)


def snapshot(workdir: Path) -> dict[str, int]:
    """mtime of every artifact; the fine-tuning checkpoints are scratch, not artifacts."""
    return {
        str(path.relative_to(workdir)): path.stat().st_mtime_ns
        for folder in ("results", "resources")
        for path in (workdir / folder).rglob("*")
        if path.is_file() and "checkpoints" not in path.parts
    }


def test_the_tiny_pipeline_runs_through_slurm_and_resumes(slurm_cluster: None, slurm_workflow: Path) -> None:
    workdir = slurm_workflow
    everything = planned_jobs(workdir)
    assert sum(everything.values()) > 20, everything

    # Run 1: kill the textual arm's fine-tuning job mid-run, then its retry (profile: retries 1).
    first = Run(workdir, "first")
    try:
        killed = [kill_when_running(first, workdir, not_before=0, skip=set())]
        # The retry's command truncates the log; a second's margin ignores the first attempt's last words.
        killed.append(kill_when_running(first, workdir, not_before=time.time() + 1, skip=set(killed)))
        returncode = first.wait()
    finally:
        first.stop()
    log = first.text()
    assert returncode != 0, log[-3000:]

    # Every job went through sbatch: the job ids the plugin logged are SLURM's own.
    run_id = first.run_id()
    assert run_id, log[-3000:]
    jobs = squeue_jobs(run_id)
    submitted = first.submitted()
    assert submitted and sorted(submitted) == sorted(jobs), (submitted, jobs)
    states = {job_id: state for job_id, (_, state) in jobs.items()}
    assert all(states[job_id] == "CANCELLED" for job_id in killed), states
    assert all(state == "COMPLETED" for job_id, state in states.items() if job_id not in killed), jobs
    # The killed job was retried once; every other job ran exactly once.
    comments = Counter(comment for comment, _ in jobs.values())
    assert comments.pop(KILLED_COMMENT) == 2, comments
    assert set(comments.values()) == {1}, comments

    # What is left: the killed fine-tuning and everything downstream of it, nothing else.
    remaining = planned_jobs(workdir)
    assert set(remaining) < set(everything)
    assert "finetune results/textual/iter1/adapter, results/textual/iter1/train_log.jsonl" in remaining
    assert not any("/binary/" in job or "results/base/" in job for job in remaining), remaining
    assert sum(remaining.values()) == len(remaining) == sum(everything.values()) - len(comments)

    # Run 2: rerunning Snakemake resumes. Only the unfinished jobs run; finished artifacts stay.
    finished = snapshot(workdir)
    second = Run(workdir, "second")
    try:
        returncode = second.wait()
    finally:
        second.stop()
    log = second.text()
    assert returncode == 0, log[-5000:]
    second_jobs = squeue_jobs(second.run_id() or "")
    assert sorted(second.submitted()) == sorted(second_jobs)
    assert {state for _, state in second_jobs.values()} == {"COMPLETED"}, second_jobs
    assert len(second_jobs) == sum(remaining.values())
    after = snapshot(workdir)
    assert {path: after.get(path) for path in finished} == finished
    assert not planned_jobs(workdir)

    # The artifacts read back through the same record types as a local run's.
    results = workdir / "results"
    assert len(read_jsonl(workdir / "resources/tasks/mbpp/train.jsonl", Problem)) == 3
    rollouts = results / "base/rollouts/mbpp/train"
    samples = read_jsonl(rollouts / "samples.jsonl", Sample)
    executions = read_jsonl(rollouts / "executions.jsonl", Execution)
    assert len(samples) == len(executions) == 3 * 2
    for arm in ARMS:
        folder = results / arm / "iter1"
        feedback = read_jsonl(folder / "feedback.jsonl", FeedbackExample)
        assert feedback and {example.mode for example in feedback} == {arm}
        assert read_jsonl(folder / "train_log.jsonl", TrainStep)
        assert (folder / "adapter" / "adapter_config.json").is_file()
        for task_set in EVAL_SETS:
            metrics = read_json(folder / "eval-good" / task_set / "metrics.json", Metrics)
            assert metrics.policy == f"{arm}/iter1"
            assert metrics.num_samples == metrics.num_problems * 2
    for task_set in EVAL_SETS:
        assert read_json(results / "base" / "eval-none" / task_set / "metrics.json", Metrics).policy == "base"
    assert (results / "summary.csv").is_file()
    # SLURM's own logs of the jobs are where the README says.
    assert list((workdir / ".snakemake" / "slurm_logs").glob("rule_finetune/*/*.log"))
