"""What changed in a policy's completions: the text features behind a change in pass rate.

For every samples.jsonl under a results folder (with the executions.jsonl beside it and the task
set it was generated for), the share of samples with each feature below and the mean completion
length, each with its 95% CI over problems (`leti.analysis.stats`: a problem's samples move together).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from leti.analysis import stats
from leti.io import ArtifactError, read_jsonl
from leti.layout import parse_samples_folder
from leti.records import Execution, ExecutionStatus, Problem, Sample
from leti.tasks.own_tests import has_own_tests

Feature = Callable[[Problem, Sample, Execution], bool]


def _failed(execution: Execution) -> bool:
    return execution.status != ExecutionStatus.passed


FEATURES: dict[str, Feature] = {
    "passed": lambda problem, sample, execution: not _failed(execution),
    "own_tests": lambda problem, sample, execution: has_own_tests(problem.prompt, sample.completion),
    "own_tests_failed": lambda problem, sample, execution: (
        _failed(execution) and has_own_tests(problem.prompt, sample.completion)
    ),
    "length_cut": lambda problem, sample, execution: sample.finish_reason == "length",
    "syntax_error": lambda problem, sample, execution: execution.exception_type == "SyntaxError",
    "markdown_fence": lambda problem, sample, execution: "```" in sample.completion,
}
DIAGNOSIS_COLUMNS = [
    "policy",
    "purpose",
    "dataset",
    "split",
    "samples",
    "feature",
    "value",
    "ci_low",
    "ci_high",
]


def diagnose_samples(
    problems: list[Problem], samples: list[Sample], executions: list[Execution]
) -> list[dict]:
    """One row per feature (and `completion_tokens`, the mean length): value and 95% CI."""
    if len(samples) != len(executions):
        raise ArtifactError(f"{len(samples)} samples but {len(executions)} executions")
    by_id = {problem.task_id: problem for problem in problems}
    order = list(dict.fromkeys(sample.task_id for sample in samples))
    index = {task_id: position for position, task_id in enumerate(order)}
    counts = np.zeros(len(order))
    tokens = np.zeros(len(order))
    features = {name: np.zeros(len(order)) for name in FEATURES}
    for sample, execution in zip(samples, executions, strict=True):
        problem = by_id.get(sample.task_id)
        if problem is None:
            raise ArtifactError(f"a sample of task {sample.task_id!r}, which is not in the task set")
        row = index[sample.task_id]
        counts[row] += 1
        tokens[row] += sample.completion_tokens
        for name, feature in FEATURES.items():
            features[name][row] += feature(problem, sample, execution)
    columns = {**features, "completion_tokens": tokens}
    rows = []
    for name, column in columns.items():
        estimate = stats.estimate([column, counts], stats.ratio_of_sums)
        rows.append(
            {"samples": len(samples), "feature": name}
            | {"value": estimate.value, "ci_low": estimate.ci_low, "ci_high": estimate.ci_high}
        )
    return rows


def diagnosis_table(results: str | os.PathLike[str], tasks: str | os.PathLike[str]) -> pd.DataFrame:
    """Every samples set under `results` (`{policy}/{purpose}/{dataset}/{split}/samples.jsonl`),
    read with its executions and its task set from `tasks/{dataset}/{split}.jsonl`."""
    root = Path(results)
    rows = []
    for samples_path in sorted(root.glob("**/samples.jsonl")):
        executions_path = samples_path.with_name("executions.jsonl")
        if not executions_path.is_file():
            continue
        try:
            policy, purpose, dataset, split = parse_samples_folder(
                samples_path.parent.relative_to(root).as_posix()
            )
        except ValueError as error:
            raise ArtifactError(f"{samples_path}: {error}") from None
        problems = read_jsonl(Path(tasks) / dataset / f"{split}.jsonl", Problem)
        found = diagnose_samples(
            problems, read_jsonl(samples_path, Sample), read_jsonl(executions_path, Execution)
        )
        where = {"policy": policy, "purpose": purpose, "dataset": dataset, "split": split}
        rows += [where | row for row in found]
    if not rows:
        raise ArtifactError(f"{results}: no samples.jsonl with an executions.jsonl beside it")
    return pd.DataFrame(rows, columns=DIAGNOSIS_COLUMNS)


def diagnosis_view(table: pd.DataFrame) -> pd.DataFrame:
    """One line per samples set, a column per feature: value [95% CI]."""
    cells = table.assign(
        cell=[
            f"{value:.1f} [{low:.1f}, {high:.1f}]"
            if feature == "completion_tokens"
            else f"{value:.3f} [{low:.3f}, {high:.3f}]"
            for feature, value, low, high in table[["feature", "value", "ci_low", "ci_high"]].itertuples(
                index=False
            )
        ]
    )
    keys = ["dataset", "split", "policy", "purpose", "samples"]
    wide = cells.pivot(index=keys, columns="feature", values="cell")
    return wide[[*FEATURES, "completion_tokens"]].reset_index()
