"""Metrics of one policy on one task set: pass@k and the outcome of every sample."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence

from leti.config import MetricsSettings
from leti.io import ArtifactError, read_jsonl, write_json
from leti.layout import parse_policy
from leti.records import Execution, ExecutionStatus, Metrics, Problem, Sample


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al. (2021), for k <= n.

    Computed as a product so that large n (HumanEval's 200+) neither overflows nor loses precision.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    probability_all_fail = 1.0
    for drawn in range(n - c + 1, n + 1):
        probability_all_fail *= 1.0 - k / drawn
    return 1.0 - probability_all_fail


def outcome(execution: Execution) -> str:
    """The error-type bucket of one sample: passed, timeout, sandbox_error, or the exception's type."""
    if execution.status is ExecutionStatus.failed:
        return execution.exception_type or "failed"
    return execution.status.value


def compute_metrics(
    problems: Sequence[Problem],
    samples: Sequence[Sample],
    executions: Sequence[Execution],
    ks: Sequence[int],
    policy: str,
) -> Metrics:
    executions_by_key = {(e.task_id, e.sample_index): e for e in executions}
    sample_keys = {(s.task_id, s.sample_index) for s in samples}
    if sample_keys != set(executions_by_key) or len(sample_keys) != len(samples):
        raise ArtifactError(
            "samples and executions do not match one to one: "
            f"{len(sample_keys - set(executions_by_key))} samples have no execution, "
            f"{len(set(executions_by_key) - sample_keys)} executions have no sample"
        )
    task_ids = {problem.task_id for problem in problems}
    unknown = {sample.task_id for sample in samples} - task_ids
    if unknown:
        raise ArtifactError(f"samples for task_ids not in the task set: {', '.join(sorted(unknown)[:5])}")

    totals: dict[str, int] = defaultdict(int)
    correct: dict[str, int] = defaultdict(int)
    for sample in samples:
        totals[sample.task_id] += 1
        correct[sample.task_id] += executions_by_key[(sample.task_id, sample.sample_index)].status is (
            ExecutionStatus.passed
        )

    pass_rates: dict[str, float] = {}
    for k in sorted(set(ks)):
        # Problems with fewer than k samples cannot estimate pass@k; k > n is reported as absent.
        estimates = [pass_at_k(totals[t], correct[t], k) for t in task_ids if totals[t] >= k]
        if estimates and len(estimates) == len(task_ids):
            pass_rates[f"pass@{k}"] = sum(estimates) / len(estimates)

    _, iteration = parse_policy(policy)
    return Metrics(
        dataset=problems[0].dataset if problems else "",
        split=problems[0].split if problems else "",
        policy=policy,
        policy_iteration=iteration,
        num_problems=len(problems),
        num_samples=len(samples),
        pass_at_k=pass_rates,
        error_types=dict(Counter(outcome(execution) for execution in executions).most_common()),
        mean_completion_tokens=sum(s.completion_tokens for s in samples) / len(samples) if samples else 0.0,
    )


def evaluate(
    tasks: str | os.PathLike[str],
    samples: str | os.PathLike[str],
    executions: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: MetricsSettings,
    policy: str,
) -> Metrics:
    metrics = compute_metrics(
        read_jsonl(tasks, Problem),
        read_jsonl(samples, Sample),
        read_jsonl(executions, Execution),
        settings.k,
        policy,
    )
    write_json(output, metrics)
    return metrics
