"""Metrics of one policy on one task set: pass@k, the outcome of every sample, the task's own
metric where it has one, each with a 95% CI over problems, and every problem's result."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from leti.analysis import stats
from leti.config import MetricsSettings
from leti.io import ArtifactError, read_jsonl, write_json
from leti.layout import parse_policy
from leti.records import Estimate, Execution, ExecutionStatus, Metrics, Problem, ProblemResult, Sample


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


# The paper's error-shift claim is about these two; every other failure is "other_error".
TRACKED_ERRORS = ("NameError", "SyntaxError")
OTHER_ERROR = "other_error"
SHARE_PREFIX = "share:"


class TaskMetric(Protocol):
    """A task's own metric beside pass@k (a task type is a task source plus a metric).

    `counts` scores one sample without running it; the counts of a problem's samples are summed,
    and `scores` turns counts summed over problems into the metric's values."""

    def counts(self, problem: Problem, completion: str) -> dict[str, int]: ...

    def scores(self, counts: dict[str, int]) -> dict[str, float]: ...


def compute_metrics(
    problems: Sequence[Problem],
    samples: Sequence[Sample],
    executions: Sequence[Execution],
    settings: MetricsSettings,
    policy: str,
    task_metric: TaskMetric | None = None,
) -> Metrics:
    executions_by_key = _match_executions(problems, samples, executions)
    samples_by_task: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        samples_by_task[sample.task_id].append(sample)
    results = [
        problem_result(
            problem,
            samples_by_task[problem.task_id],
            [executions_by_key[(s.task_id, s.sample_index)] for s in samples_by_task[problem.task_id]],
            task_metric,
        )
        for problem in problems
    ]
    pass_rates = {
        name: float(np.mean(values)) for name, values in pass_at_k_columns(results, settings.k).items()
    }
    task_metrics = task_metric.scores(_summed_counts(results)) if task_metric and results else {}

    _, iteration = parse_policy(policy)
    return Metrics(
        dataset=problems[0].dataset if problems else "",
        split=problems[0].split if problems else "",
        policy=policy,
        policy_iteration=iteration,
        purpose=settings.purpose,
        reward_prefix=settings.reward_prefix,
        task_metric=settings.task_metric,
        num_problems=len(problems),
        num_samples=len(samples),
        pass_at_k=pass_rates,
        error_types=dict(Counter(outcome(execution) for execution in executions).most_common()),
        task_metrics=task_metrics,
        estimates=estimates(results, settings.k, task_metric),
        mean_completion_tokens=sum(s.completion_tokens for s in samples) / len(samples) if samples else 0.0,
        problems=results,
    )


def problem_result(
    problem: Problem,
    samples: Sequence[Sample],
    executions: Sequence[Execution],
    task_metric: TaskMetric | None = None,
) -> ProblemResult:
    counts: Counter[str] = Counter()
    if task_metric is not None:
        for sample in samples:
            counts.update(task_metric.counts(problem, sample.completion))
    return ProblemResult(
        task_id=problem.task_id,
        samples=len(samples),
        passed=sum(execution.status is ExecutionStatus.passed for execution in executions),
        outcomes=dict(Counter(outcome(execution) for execution in executions)),
        counts=dict(counts),
    )


def pass_at_k_columns(results: Sequence[ProblemResult], ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-problem pass@k estimates, for each k every problem has at least k samples for
    (a k larger than some problem's n is left out: it cannot be estimated)."""
    return {
        f"pass@{k}": np.array([pass_at_k(r.samples, r.passed, k) for r in results])
        for k in sorted(set(ks))
        if results and all(r.samples >= k for r in results)
    }


def outcome_share_columns(results: Sequence[ProblemResult]) -> dict[str, list[np.ndarray]]:
    """(count, samples) per problem for every outcome seen, passed and the tracked errors (seen or
    not: a share of 0 is a result), and other_error."""
    samples = np.array([r.samples for r in results], dtype=float)
    names = sorted({name for r in results for name in r.outcomes} | {"passed", *TRACKED_ERRORS})
    columns = {name: np.array([r.outcomes.get(name, 0) for r in results], dtype=float) for name in names}
    untracked = [name for name in names if name not in ("passed", *TRACKED_ERRORS)]
    columns[OTHER_ERROR] = sum((columns[name] for name in untracked), np.zeros(len(results)))
    return {f"{SHARE_PREFIX}{name}": [count, samples] for name, count in columns.items()}


def task_metric_columns(
    results: Sequence[ProblemResult], names: Sequence[str] | None = None
) -> tuple[list[str], list[np.ndarray]]:
    """The task metric's count names (by default every name counted) and one per-problem column each."""
    names = sorted({name for r in results for name in r.counts}) if names is None else list(names)
    return names, [np.array([r.counts.get(name, 0) for r in results], dtype=float) for name in names]


def task_metric_statistic(task_metric: TaskMetric, names: list[str], metric: str) -> stats.Statistic:
    """One task metric as a statistic of per-problem count columns (summed, then scored)."""

    def score(*sums: float) -> float:
        return task_metric.scores(dict(zip(names, (int(total) for total in sums), strict=True)))[metric]

    vectorised = np.vectorize(score, otypes=[float])

    def statistic(*columns: np.ndarray) -> np.ndarray:
        return vectorised(*(np.sum(column, axis=-1) for column in columns))

    return statistic


def estimates(
    results: Sequence[ProblemResult], ks: Sequence[int], task_metric: TaskMetric | None
) -> dict[str, Estimate]:
    """Every statistic of the evaluation with its 95% CI, resampling problems."""
    if not results:
        return {}
    found = {name: stats.estimate([column]) for name, column in pass_at_k_columns(results, ks).items()}
    found |= {
        name: stats.estimate(columns, stats.ratio_of_sums)
        for name, columns in outcome_share_columns(results).items()
    }
    if task_metric is not None:
        names, columns = task_metric_columns(results)
        for metric in task_metric.scores(_summed_counts(results)):
            statistic = task_metric_statistic(task_metric, names, metric)
            found[metric] = stats.estimate(columns, statistic)
    return found


def _summed_counts(results: Sequence[ProblemResult]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for result in results:
        total.update(result.counts)
    return dict(total)


def _match_executions(
    problems: Sequence[Problem], samples: Sequence[Sample], executions: Sequence[Execution]
) -> dict[tuple[str, int], Execution]:
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
    return executions_by_key


def evaluate(
    tasks: str | os.PathLike[str],
    samples: str | os.PathLike[str],
    executions: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: MetricsSettings,
    policy: str,
) -> Metrics:
    metrics = compute_metrics(
        read_jsonl(tasks, Problem)[: settings.max_problems],
        read_jsonl(samples, Sample),
        read_jsonl(executions, Execution),
        settings,
        policy,
        task_metric_named(settings.task_metric),
    )
    write_json(output, metrics)
    return metrics


def task_metric_named(name: str | None) -> TaskMetric | None:
    """The task metric a task type names in the config (None: pass@k only)."""
    if name is None:
        return None
    if name == "eae":
        from leti.tasks.eae.source import ArgumentMetric

        return ArgumentMetric()
    raise ValueError(f"no task metric {name!r}")
