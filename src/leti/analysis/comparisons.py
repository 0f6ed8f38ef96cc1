"""Paired comparisons of policies on the same problems: is a difference signal or noise?

Three kinds, each on every evaluation task set:
- `vs_base`: every trained policy against the base model (per reward prefix);
- `arm_vs_arm`: two arms at the same iteration and reward prefix;
- `good_vs_bad` (and `good_vs_none`): one trained policy under two reward prefixes, the check that
  it learned what the reward tokens mean;
- `run_vs_run` (`leti compare`): the same evaluation in two runs, e.g. a departure from the
  reference against the faithful setting;
- `probe_good_vs_bad` and `probe_vs_base` (metric `loglik_per_token`, leti.probe): the reference
  solutions' mean log-likelihood per token after <|good|> against after <|bad|> under one policy,
  and under a trained policy after <|good|> against under the base model;
- `probe_generation_vs_base` (metric `generation_loglik_per_token`): the same shift against the base
  model with both policies as generation runs them (`leti probe --as-generated`); divided by
  `probe_vs_base`'s, the share of the update that generation keeps (`generation_shift_ratios`).
Each row has the difference a - b, its 95% paired-bootstrap CI and an exact paired test's p-value
(leti.analysis.stats), for every pass@k and every task metric both sides have. `p_adjusted` is the
Benjamini-Hochberg adjustment within the row's family (kind, task set and metric): a sweep tests
every setting against the base model at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import TypeVar

import numpy as np
import pandas as pd

from leti.analysis import stats
from leti.evaluate import pass_at_k_columns, task_metric_columns, task_metric_named, task_metric_statistic
from leti.layout import BASE_POLICY, parse_policy
from leti.records import Estimate, GenerationProbe, Metrics, Probe, ProblemResult

COMPARISON_COLUMNS = [
    "kind",
    "dataset",
    "split",
    "metric",
    "policy_a",
    "reward_prefix_a",
    "policy_b",
    "reward_prefix_b",
    "num_problems",
    "value_a",
    "value_b",
    "difference",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjusted",
    "test",
]

# The probe's paired measure, per problem; and the same, with the policies as generation runs them.
PROBE_METRIC = "loglik_per_token"
GENERATION_PROBE_METRIC = "generation_loglik_per_token"

# Prefix contrasts, each (a, b): a - b.
PREFIX_CONTRASTS = (("good", "bad"), ("good", "none"))

AnyProbe = Probe | GenerationProbe
ProbeT = TypeVar("ProbeT", Probe, GenerationProbe)


def comparison_pairs(documents: Sequence[Metrics]) -> list[tuple[str, Metrics, Metrics]]:
    """(kind, a, b) for every comparison the evaluations allow."""
    pairs: list[tuple[str, Metrics, Metrics]] = []
    evaluations = [d for d in documents if d.purpose == "eval"]
    for _, group in itertools.groupby(
        sorted(evaluations, key=_task_set_order), key=lambda d: (d.dataset, d.split)
    ):
        task_set = list(group)
        base = next((d for d in task_set if d.policy == BASE_POLICY), None)
        trained = [d for d in task_set if d.policy != BASE_POLICY]
        if base is not None:
            pairs += [("vs_base", d, base) for d in trained]
        same_stage = itertools.groupby(trained, key=lambda d: (d.policy_iteration, d.reward_prefix))
        for _, stage in same_stage:
            pairs += [("arm_vs_arm", a, b) for a, b in itertools.combinations(list(stage), 2)]
        by_policy = {(d.policy, d.reward_prefix): d for d in trained}
        for policy in dict.fromkeys(d.policy for d in trained):
            for prefix_a, prefix_b in PREFIX_CONTRASTS:
                if (policy, prefix_a) in by_policy and (policy, prefix_b) in by_policy:
                    kind = f"{prefix_a}_vs_{prefix_b}"
                    pairs.append((kind, by_policy[(policy, prefix_a)], by_policy[(policy, prefix_b)]))
    return pairs


def compare_documents(kind: str, a: Metrics, b: Metrics) -> list[dict]:
    """One row per metric both evaluations have, on the problems both have (in a's order)."""
    results_b = {result.task_id: result for result in b.problems}
    shared = [result for result in a.problems if result.task_id in results_b]
    if not shared:
        return []
    paired_b = [results_b[result.task_id] for result in shared]
    return [
        comparison_row(
            kind,
            a.dataset,
            a.split,
            metric,
            (a.policy, a.reward_prefix),
            (b.policy, b.reward_prefix),
            stats.compare(columns_a, columns_b, statistic),
        )
        for metric, (columns_a, columns_b, statistic) in _metric_columns(a, shared, paired_b).items()
    ]


def comparison_row(
    kind: str,
    dataset: str,
    split: str,
    metric: str,
    a: tuple[str, str],
    b: tuple[str, str],
    comparison: stats.PairedComparison,
) -> dict:
    """A row of comparisons.csv; `a` and `b` are (policy, reward prefix)."""
    return {
        "kind": kind,
        "dataset": dataset,
        "split": split,
        "metric": metric,
        "policy_a": a[0],
        "reward_prefix_a": a[1],
        "policy_b": b[0],
        "reward_prefix_b": b[1],
        "num_problems": comparison.num_problems,
        "value_a": comparison.value_a,
        "value_b": comparison.value_b,
        "difference": comparison.difference,
        "ci_low": comparison.ci_low,
        "ci_high": comparison.ci_high,
        "p_value": comparison.p_value,
        "test": comparison.test,
    }


def comparisons_table(
    documents: Iterable[Metrics],
    probes: Sequence[Probe] = (),
    generation_probes: Sequence[GenerationProbe] = (),
) -> pd.DataFrame:
    documents = list(documents)
    rows = [row for kind, a, b in comparison_pairs(documents) for row in compare_documents(kind, a, b)]
    rows += probe_comparisons(probes)
    rows += generation_probe_comparisons(generation_probes)
    return with_adjusted_p(pd.DataFrame(rows, columns=COMPARISON_COLUMNS))


def with_adjusted_p(table: pd.DataFrame) -> pd.DataFrame:
    """`p_adjusted`: each family's p-values (same kind, task set and metric) adjusted together."""
    families = table.groupby(["kind", "dataset", "split", "metric"], sort=False)["p_value"]
    return table.assign(p_adjusted=families.transform(lambda p: stats.false_discovery_adjusted(p.to_numpy())))


def probe_comparisons(probes: Sequence[Probe]) -> list[dict]:
    """good - bad under every probed policy, and each trained policy's good against the base model's."""
    rows = [compare_probes("probe_good_vs_bad", (probe, "good"), (probe, "bad")) for probe in probes]
    rows += [
        compare_probes("probe_vs_base", (probe, "good"), (base, "good"))
        for probe, base in policies_and_bases(probes)
    ]
    return [row for row in rows if row is not None]


def generation_probe_comparisons(probes: Sequence[GenerationProbe]) -> list[dict]:
    """Each trained policy's likelihoods after <|good|> against the base model's, both as generation runs them."""
    rows = [
        compare_probes("probe_generation_vs_base", (probe, "good"), (base, "good"), GENERATION_PROBE_METRIC)
        for probe, base in policies_and_bases(probes)
    ]
    return [row for row in rows if row is not None]


def policies_and_bases(probes: Sequence[ProbeT]) -> list[tuple[ProbeT, ProbeT]]:
    """(a trained policy's probe, the base model's probe of the same task set), where both exist."""
    bases = {(probe.dataset, probe.split): probe for probe in probes if probe.policy == BASE_POLICY}
    return [
        (probe, base)
        for probe in probes
        if probe.policy != BASE_POLICY and (base := bases.get((probe.dataset, probe.split))) is not None
    ]


def compare_probes(
    kind: str, a: tuple[AnyProbe, str], b: tuple[AnyProbe, str], metric: str = PROBE_METRIC
) -> dict | None:
    """One row: a's per-problem likelihoods after one reward token minus b's, on the problems both scored."""
    (probe_a, prefix_a), (probe_b, prefix_b) = a, b
    scores_b = {problem.task_id: getattr(problem, prefix_b) for problem in probe_b.problems}
    shared = [problem for problem in probe_a.problems if problem.task_id in scores_b]
    if not shared:
        return None
    comparison = stats.compare(
        [np.array([getattr(problem, prefix_a) for problem in shared])],
        [np.array([scores_b[problem.task_id] for problem in shared])],
    )
    where = (probe_a.dataset, probe_a.split, metric)
    return comparison_row(kind, *where, (probe_a.policy, prefix_a), (probe_b.policy, prefix_b), comparison)


def generation_shift_ratios(
    probes: Sequence[Probe], generation_probes: Sequence[GenerationProbe]
) -> dict[tuple[str, str, str], Estimate]:
    """Per trained policy and task set ((policy, dataset, split)): how much of its update's shift the
    generating policy keeps. Its likelihood shift after <|good|> against the base model with both as
    generation runs them, divided by the same shift in the float32 probe: a ratio of means over the
    problems all four scored, with its paired bootstrap CI (problems resampled with all four sides).
    None for a policy whose float32 shift is exactly 0."""
    float32 = {(probe.policy, probe.dataset, probe.split): probe for probe in probes}
    ratios: dict[tuple[str, str, str], Estimate] = {}
    for generated, generated_base in policies_and_bases(generation_probes):
        key = (generated.policy, generated.dataset, generated.split)
        scored, scored_base = float32.get(key), float32.get((BASE_POLICY, *key[1:]))
        if scored is None or scored_base is None:
            continue
        sides = [
            {problem.task_id: problem.good for problem in side.problems}
            for side in (generated, generated_base, scored, scored_base)
        ]
        shared = [task_id for task_id in sides[0] if all(task_id in side for side in sides[1:])]
        columns = [np.array([side[task_id] for task_id in shared]) for side in sides]
        generation_shift, float32_shift = columns[0] - columns[1], columns[2] - columns[3]
        if shared and float32_shift.mean() != 0:
            ratios[key] = stats.estimate([generation_shift, float32_shift], stats.ratio_of_means)
    return ratios


def runs_table(documents_a: Iterable[Metrics], documents_b: Iterable[Metrics]) -> pd.DataFrame:
    """Every evaluation the two runs share (same policy, reward prefix and task set), a - b."""
    by_key = {_evaluation_key(document): document for document in documents_b if document.purpose == "eval"}
    pairs = [(a, by_key.get(_evaluation_key(a))) for a in sorted(documents_a, key=_task_set_order)]
    rows = [
        row
        for a, b in pairs
        if a.purpose == "eval" and b is not None
        for row in compare_documents("run_vs_run", a, b)
    ]
    return with_adjusted_p(pd.DataFrame(rows, columns=COMPARISON_COLUMNS))


def _evaluation_key(document: Metrics) -> tuple:
    return document.policy, document.reward_prefix, document.dataset, document.split


def _metric_columns(
    a: Metrics, results_a: list[ProblemResult], results_b: list[ProblemResult]
) -> dict[str, tuple[list[np.ndarray], list[np.ndarray], stats.Statistic]]:
    """Per metric: a's columns, b's columns (same problems, same order) and the statistic."""
    passes_a = pass_at_k_columns(results_a, [int(name.removeprefix("pass@")) for name in a.pass_at_k])
    passes_b = pass_at_k_columns(results_b, [int(name.removeprefix("pass@")) for name in a.pass_at_k])
    metrics = {
        name: ([passes_a[name]], [passes_b[name]], stats.mean) for name in passes_a if name in passes_b
    }
    task_metric = task_metric_named(a.task_metric)
    if task_metric is not None:
        names, columns_a = task_metric_columns(results_a)
        _, columns_b = task_metric_columns(results_b, names)
        for metric in a.task_metrics:
            metrics[metric] = (columns_a, columns_b, task_metric_statistic(task_metric, names, metric))
    return metrics


def _task_set_order(document: Metrics) -> tuple:
    experiment, iteration = parse_policy(document.policy)
    return document.dataset, document.split, iteration, document.reward_prefix, experiment or ""
