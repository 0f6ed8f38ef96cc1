"""Text features behind a change in pass rate, per samples set, with CIs over problems."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from leti.analysis.diagnose import DIAGNOSIS_COLUMNS, diagnose_samples
from leti.io import ArtifactError, write_jsonl
from leti.records import Execution, ExecutionStatus, Problem, Sample

PROMPT = '"""\nWrite a function to double a number.\nassert double(2)==4\n"""'
SOLUTION = "\ndef double(x):\n    return 2 * x\n"
OWN_TEST = SOLUTION + "\ndef check():\n    assert double(3) == 7\ncheck()\n"


def problem(task_id: str) -> Problem:
    return Problem(
        task_id=task_id, dataset="mbpp", split="test", prompt=PROMPT, test_code="assert double(2)==4"
    )


def sample(task_id: str, index: int, completion: str, reason: str = "stop", tokens: int = 10) -> Sample:
    return Sample(
        task_id=task_id, completion=completion, policy_iteration=1, sample_index=index, seed=0,
        prompt_tokens=5, completion_tokens=tokens, finish_reason=reason,
    )  # fmt: skip


def execution(task_id: str, index: int, error: str | None) -> Execution:
    status = ExecutionStatus.passed if error is None else ExecutionStatus.failed
    return Execution(task_id=task_id, sample_index=index, status=status, exception_type=error, duration_s=0.1)


def artifacts() -> tuple[list[Problem], list[Sample], list[Execution]]:
    """Problem A: a passing solution and one failing on its own test. Problem B: a sample cut at
    max_new_tokens into a SyntaxError, and one with a Markdown fence."""
    samples = [
        sample("A", 0, SOLUTION, tokens=10),
        sample("A", 1, OWN_TEST, tokens=30),
        sample("B", 0, SOLUTION + "def half(x:\n", "length", tokens=192),
        sample("B", 1, SOLUTION + "```\nIt doubles.", tokens=20),
    ]
    executions = [
        execution("A", 0, None),
        execution("A", 1, "AssertionError"),
        execution("B", 0, "SyntaxError"),
        execution("B", 1, "SyntaxError"),
    ]
    return [problem("A"), problem("B")], samples, executions


def test_each_feature_is_a_share_of_the_samples() -> None:
    values = {row["feature"]: row["value"] for row in diagnose_samples(*artifacts())}
    assert values == pytest.approx(
        {
            "passed": 0.25,
            "own_tests": 0.25,
            "own_tests_failed": 0.25,
            "length_cut": 0.25,
            "syntax_error": 0.5,
            "markdown_fence": 0.25,
            "completion_tokens": (10 + 30 + 192 + 20) / 4,
        }
    )


def test_intervals_resample_problems() -> None:
    rows = {row["feature"]: row for row in diagnose_samples(*artifacts())}
    # Problem A has every own test, problem B none: the resamples range from 0 to half the samples.
    assert rows["own_tests"]["ci_low"] == pytest.approx(0.0)
    assert rows["own_tests"]["ci_high"] == pytest.approx(0.5)
    assert rows["syntax_error"]["ci_low"] <= 0.5 <= rows["syntax_error"]["ci_high"]


def test_the_command_reads_a_results_folder(tmp_path: Path) -> None:
    problems, samples, executions = artifacts()
    folder = tmp_path / "results" / "textual" / "iter1" / "eval-good" / "mbpp" / "test"
    write_jsonl(folder / "samples.jsonl", samples)
    write_jsonl(folder / "executions.jsonl", executions)
    write_jsonl(tmp_path / "tasks" / "mbpp" / "test.jsonl", problems)
    output = tmp_path / "diagnosis.csv"
    leti = str(Path(sys.executable).parent / "leti")
    command = [
        leti,
        "diagnose",
        str(tmp_path / "results"),
        "--tasks",
        str(tmp_path / "tasks"),
        "--output",
        str(output),
    ]
    shown = subprocess.run(command, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "mbpp/test" in shown.stdout and "textual/iter1" in shown.stdout
    table = pd.read_csv(output)
    assert list(table.columns) == DIAGNOSIS_COLUMNS
    assert set(table["policy"]) == {"textual/iter1"} and set(table["purpose"]) == {"eval-good"}
    assert len(table) == 7


def test_samples_and_executions_must_match() -> None:
    problems, samples, executions = artifacts()
    with pytest.raises(ArtifactError, match="4 samples but 3 executions"):
        diagnose_samples(problems, samples, executions[:3])
