from __future__ import annotations

import math
from pathlib import Path

import pytest

from leti.config import MetricsSettings
from leti.evaluate import compute_metrics, evaluate, pass_at_k
from leti.io import ArtifactError, read_json, write_jsonl
from leti.records import Execution, ExecutionStatus, Metrics, Problem, Sample


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 200])
def test_pass_at_k_matches_the_closed_form(n: int) -> None:
    for c in range(n + 1):
        for k in {1, 2, 10, n} & set(range(1, n + 1)):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def problem(task_id: str) -> Problem:
    return Problem(task_id=task_id, dataset="mbpp", split="test", prompt="p", test_code="t")


def sample(task_id: str, index: int, tokens: int = 10) -> Sample:
    return Sample(
        task_id=task_id,
        completion="c",
        policy_iteration=1,
        sample_index=index,
        seed=0,
        prompt_tokens=3,
        completion_tokens=tokens,
        finish_reason="stop",
    )


def execution(task_id: str, index: int, status: str, exception: str | None = None) -> Execution:
    return Execution(
        task_id=task_id,
        sample_index=index,
        status=ExecutionStatus(status),
        exception_type=exception,
        duration_s=0.1,
    )


@pytest.fixture
def artifacts() -> tuple[list[Problem], list[Sample], list[Execution]]:
    problems = [problem("MBPP/1"), problem("MBPP/2")]
    samples = [sample("MBPP/1", i, tokens=10 * (i + 1)) for i in range(2)] + [
        sample("MBPP/2", i) for i in range(2)
    ]
    executions = [
        execution("MBPP/1", 0, "passed"),
        execution("MBPP/1", 1, "failed", "AssertionError"),
        execution("MBPP/2", 0, "timeout"),
        execution("MBPP/2", 1, "failed", "NameError"),
    ]
    return problems, samples, executions


def test_metrics_average_pass_at_k_over_problems_and_skip_k_above_n(artifacts) -> None:
    metrics = compute_metrics(*artifacts, MetricsSettings(k=[1, 2, 3]), policy="textual/iter1")
    assert metrics.pass_at_k == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}
    assert metrics.error_types == {"passed": 1, "AssertionError": 1, "timeout": 1, "NameError": 1}
    assert (metrics.num_problems, metrics.num_samples, metrics.policy_iteration) == (2, 4, 1)
    assert metrics.mean_completion_tokens == pytest.approx(12.5)


def test_samples_without_executions_are_an_error(artifacts) -> None:
    problems, samples, executions = artifacts
    with pytest.raises(ArtifactError, match="1 samples have no execution"):
        compute_metrics(problems, samples, executions[:-1], MetricsSettings(), policy="base")


def test_samples_for_unknown_problems_are_an_error(artifacts) -> None:
    problems, samples, executions = artifacts
    with pytest.raises(ArtifactError, match="not in the task set: MBPP/2"):
        compute_metrics(problems[:1], samples, executions, MetricsSettings(), policy="base")


def test_evaluate_writes_a_metrics_document(tmp_path: Path, artifacts) -> None:
    paths = [tmp_path / name for name in ("tasks.jsonl", "samples.jsonl", "executions.jsonl")]
    for path, records in zip(paths, artifacts, strict=True):
        write_jsonl(path, records)
    output = tmp_path / "eval" / "metrics.json"
    evaluate(*paths, output, MetricsSettings(k=[1]), policy="base")
    written = read_json(output, Metrics)
    assert written.pass_at_k == {"pass@1": pytest.approx(0.25)}
    assert (written.dataset, written.split, written.policy) == ("mbpp", "test", "base")


def test_metrics_keep_every_problem_result_and_estimate_shares(artifacts) -> None:
    metrics = compute_metrics(*artifacts, MetricsSettings(k=[1, 2]), policy="textual/iter1")
    assert [(r.task_id, r.samples, r.passed) for r in metrics.problems] == [
        ("MBPP/1", 2, 1),
        ("MBPP/2", 2, 0),
    ]
    assert metrics.problems[1].outcomes == {"timeout": 1, "NameError": 1}
    estimates = metrics.estimates
    assert estimates["pass@1"].value == pytest.approx(0.25)
    assert estimates["pass@1"].ci_low <= 0.25 <= estimates["pass@1"].ci_high
    # Shares are of samples: NameError 1 of 4, SyntaxError always reported, other = AssertionError + timeout.
    assert estimates["share:NameError"].value == pytest.approx(0.25)
    assert estimates["share:SyntaxError"].value == 0.0
    assert estimates["share:other_error"].value == pytest.approx(0.5)
    assert estimates["share:passed"].value == pytest.approx(0.25)


def test_an_evaluation_limited_to_the_first_problems_scores_only_those(tmp_path: Path, artifacts) -> None:
    problems, samples, executions = artifacts
    paths = [tmp_path / name for name in ("tasks.jsonl", "samples.jsonl", "executions.jsonl")]
    first_only = (
        [s for s in samples if s.task_id == "MBPP/1"],
        [e for e in executions if e.task_id == "MBPP/1"],
    )
    for path, records in zip(paths, (problems, *first_only), strict=True):
        write_jsonl(path, records)
    output = tmp_path / "metrics.json"
    evaluate(*paths, output, MetricsSettings(k=[1], max_problems=1), policy="base")
    written = read_json(output, Metrics)
    assert (written.num_problems, written.pass_at_k) == (1, {"pass@1": pytest.approx(0.5)})
    assert [result.task_id for result in written.problems] == ["MBPP/1"]


def test_the_passed_share_is_reported_when_nothing_passed(artifacts) -> None:
    problems, samples, executions = artifacts
    failed = [
        e.model_copy(update={"status": ExecutionStatus.failed, "exception_type": "ValueError"})
        for e in executions
    ]
    estimates = compute_metrics(problems, samples, failed, MetricsSettings(), policy="base").estimates
    assert (estimates["share:passed"].value, estimates["share:passed"].ci_high) == (0.0, 0.0)
    assert estimates["share:other_error"].value == 1.0
