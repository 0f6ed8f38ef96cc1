"""What a researcher reads afterwards: the summary files and figures, a look inside any artifact, and
the tables printed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from leti.analysis.comparisons import COMPARISON_COLUMNS, comparisons_table, runs_table
from leti.analysis.tables import (
    metrics_under,
    outcome_table,
    pass_at_k_table,
    probe_table,
    read_generation_probes,
    read_metrics,
    read_probes,
    rule_times,
    share_table,
    summary_table,
    timing_table,
    training_logs,
    update_table,
    with_ci,
)
from leti.io import ArtifactError, read_json, read_jsonl
from leti.records import Execution, FeedbackExample, Metrics, Problem, Sample, TrainStep


def summarize(
    metrics_paths: Sequence[str | os.PathLike[str]],
    train_log_paths: Sequence[str | os.PathLike[str]],
    outputs: SummaryOutputs,
    probe_paths: Sequence[str | os.PathLike[str]] = (),
    generation_probe_paths: Sequence[str | os.PathLike[str]] = (),
) -> pd.DataFrame:
    from leti.analysis.plots import (
        plot_error_types,
        plot_pass_at_k,
        plot_reward_probe,
        plot_sample_efficiency,
        plot_training_loss,
    )
    from leti.io import write_csv

    documents = read_metrics(metrics_paths)
    probes = read_probes(probe_paths)
    generation_probes = read_generation_probes(generation_probe_paths)
    summary = summary_table(documents, train_log_paths, probes, generation_probes)
    comparisons = comparisons_table(documents, probes, generation_probes)
    write_csv(outputs.csv, summary)
    write_csv(outputs.comparisons, comparisons)
    plot_reward_probe(comparisons, outputs.reward_probe_png)
    plot_pass_at_k(summary, outputs.pass_at_k_png)
    plot_sample_efficiency(summary, outputs.sample_efficiency_png)
    plot_error_types(summary, outputs.error_types_png)
    plot_training_loss(training_logs(train_log_paths), outputs.loss_png)
    return summary


@dataclass(frozen=True)
class SummaryOutputs:
    """Where `leti summarize` writes."""

    csv: Path
    comparisons: Path
    pass_at_k_png: Path
    sample_efficiency_png: Path
    error_types_png: Path
    loss_png: Path
    reward_probe_png: Path


# --- looking inside one artifact

ARTIFACT_KINDS: dict[str, type[BaseModel]] = {
    "samples.jsonl": Sample,
    "executions.jsonl": Execution,
    "feedback.jsonl": FeedbackExample,
    "metrics.json": Metrics,
    "train_log.jsonl": TrainStep,
}


def artifact_kind(path: Path) -> type[BaseModel]:
    if path.name in ARTIFACT_KINDS:
        return ARTIFACT_KINDS[path.name]
    if path.suffix == ".jsonl" and "tasks" in path.parts:
        return Problem
    known = ", ".join([*ARTIFACT_KINDS, "tasks/{dataset}/{split}.jsonl"])
    raise ArtifactError(f"{path}: not a known artifact; known: {known}")


def inspect_artifact(
    path: str | os.PathLike[str],
    console: Console,
    task_id: str | None = None,
    status: str | None = None,
    examples: int = 3,
) -> None:
    """Counts by outcome, then a few records matching the filters."""
    source = Path(path)
    kind = artifact_kind(source)
    records = [read_json(source, Metrics)] if kind is Metrics else read_jsonl(source, kind)
    frame = pd.DataFrame([record.model_dump(mode="json") for record in records])
    console.print(f"[bold]{source}[/]: {len(records)} {kind.__name__} record(s)")
    if kind is Metrics:
        _print_metrics(records[0], console)
        return
    for column in _COUNT_COLUMNS.get(kind, []):
        if column in frame and not frame.empty:
            _print_counts(frame[column].fillna("-").value_counts(), column, console)
    if kind is Execution and not frame.empty:
        outcome = frame["status"].where(frame["status"] != "failed", frame["exception_type"].fillna("failed"))
        _print_counts(outcome.value_counts(), "outcome", console)
    selected = [
        record
        for record in records
        if (task_id is None or getattr(record, "task_id", None) == task_id)
        and (status is None or status in _labels(record))
    ]
    for record in selected[:examples]:
        console.rule()
        for name, value in record.model_dump(mode="json").items():
            console.print(f"[bold cyan]{name}[/]: ", end="")
            console.print(
                value if not isinstance(value, str) or "\n" not in value else "\n" + value,
                markup=False,
                highlight=False,
            )
    if (task_id or status) and not selected:
        console.print("no record matches the filters")


def _labels(record: BaseModel) -> set[str]:
    """What `--status` matches: an execution's status or exception type, a feedback reward, a finish reason."""
    if isinstance(record, Execution):
        return {record.status.value, record.exception_type or ""}
    if isinstance(record, FeedbackExample):
        return {record.reward}
    if isinstance(record, Sample):
        return {record.finish_reason}
    return set()


_COUNT_COLUMNS: dict[type[BaseModel], list[str]] = {
    Problem: ["dataset", "split"],
    Sample: ["policy_iteration", "finish_reason"],
    Execution: ["status"],
    FeedbackExample: ["mode", "reward"],
    TrainStep: ["epoch"],
}


def _print_counts(counts: pd.Series, name: str, console: Console) -> None:
    table = Table(name, "count", "share")
    total = counts.sum()
    for value, count in counts.items():
        table.add_row(str(value), str(count), f"{count / total:.1%}")
    console.print(table)


def _print_metrics(metrics: Metrics, console: Console) -> None:
    table = Table("metric", "value [95% CI]")
    for name, value in {**metrics.pass_at_k, **metrics.task_metrics}.items():
        estimate = metrics.estimates.get(name)
        table.add_row(name, with_ci(value, estimate.ci_low, estimate.ci_high) if estimate else f"{value:.3f}")
    table.add_row("problems", str(metrics.num_problems))
    table.add_row("samples", str(metrics.num_samples))
    table.add_row("mean completion tokens", f"{metrics.mean_completion_tokens:.1f}")
    console.print(table)
    _print_counts(pd.Series(metrics.error_types), "outcome", console)


def print_summary(results: str | os.PathLike[str], output: TableOutput) -> None:
    """Every metrics.json under `results`: pass@k with CIs by arm, iteration and reward prefix,
    the outcome counts and shares, the reward-token probes, each update against what it did, and the
    paired comparisons (`comparisons.csv` when the workflow wrote one, else computed here)."""
    root = Path(results)
    documents = metrics_under(root)
    probes = read_probes(sorted(root.glob("**/probe.json")))
    generation_probes = read_generation_probes(sorted(root.glob("**/probe/*/*/generation.json")))
    train_logs = sorted(root.glob("**/train_log.jsonl"))
    summary = summary_table(documents, train_logs, probes, generation_probes)
    output.table(pass_at_k_table(summary), "pass@k with 95% CIs (steps: optimizer steps so far)")
    for table, title in [
        (outcome_table(summary), "samples by outcome"),
        (share_table(summary), "share of samples, 95% CIs"),
    ]:
        # A task set's tables show the policies evaluated on it.
        for tasks, rows in table.groupby("tasks", sort=False):
            output.table(rows.drop(columns="tasks").dropna(axis=1, how="all"), f"{tasks}: {title}")
    if probes:
        title = "reward-token probe: reference solutions' log-likelihood per token, 95% CIs"
        output.table(probe_table(summary), title, "{:.4f}")
    saved = root / "comparisons.csv"
    comparisons = pd.read_csv(saved) if saved.is_file() else pd.DataFrame()
    if not set(COMPARISON_COLUMNS) <= set(comparisons.columns):
        # None written yet, or one written by an earlier version without today's columns.
        comparisons = comparisons_table(documents, probes, generation_probes)
    if not comparisons.empty:
        updates = update_table(comparisons, training_logs(train_logs))
        if not updates.empty:
            title = "each trained policy: its update (loss at the end: mean of its last quarter of steps) and what it did"
            output.table(updates, title)
        output.table(comparison_view(comparisons), "paired comparisons: a - b on the same problems")


def compare_runs(
    results_a: str | os.PathLike[str], results_b: str | os.PathLike[str], output: TableOutput
) -> pd.DataFrame:
    """The evaluations two results folders share, paired problem by problem (a - b), printed."""
    table = runs_table(metrics_under(results_a), metrics_under(results_b))
    if table.empty:
        raise ArtifactError(f"{results_a} and {results_b} share no evaluation (policy, prefix and task set)")
    view = comparison_view(table).drop(columns="b").rename(columns={"a": "policy"})
    view.insert(3, "a", table["value_a"].map("{:.3f}".format))
    view.insert(4, "b", table["value_b"].map("{:.3f}".format))
    output.table(view, f"a - b on the same problems; a: {results_a}, b: {results_b}")
    return table


def comparison_view(comparisons: pd.DataFrame) -> pd.DataFrame:
    """comparisons.csv for reading: a and b with their prefixes, the difference with its CI, p."""

    def side(policy: pd.Series, prefix: pd.Series) -> pd.Series:
        # The base model's evaluations have no prefix; its probe sides have <good> and <bad>.
        return policy.where(prefix == "none", policy + " <" + prefix + ">")

    return pd.DataFrame(
        {
            "tasks": comparisons["dataset"] + "/" + comparisons["split"],
            "metric": comparisons["metric"],
            "a": side(comparisons["policy_a"], comparisons["reward_prefix_a"]),
            "b": side(comparisons["policy_b"], comparisons["reward_prefix_b"]),
            "problems": comparisons["num_problems"].astype(str),
            "a - b [95% CI]": [
                f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"
                for d, low, high in comparisons[["difference", "ci_low", "ci_high"]].itertuples(index=False)
            ],
            "p": comparisons["p_value"].map(lambda p: f"{p:.3g}"),
            "p (BH)": comparisons["p_adjusted"].map(lambda p: f"{p:.3g}"),
            "test": comparisons["test"],
        }
    )


def print_timings(benchmarks: str | os.PathLike[str], output: TableOutput) -> None:
    """Per-rule wall times and peak memory of the jobs benchmarked under `benchmarks`."""
    rules = rule_times(timing_table(benchmarks))
    output.table(rules, "jobs by rule", float_format="{:.0f}")
    output.line(f"{rules['jobs'].sum()} jobs, {rules['seconds'].sum() / 60:.1f} min of job wall time in all")


@dataclass(frozen=True)
class TableOutput:
    """Where the commands' tables go: a rich console, or Markdown text to paste into notes."""

    console: Console
    markdown: bool = False

    def table(self, frame: pd.DataFrame, title: str, float_format: str = "{:.3f}") -> None:
        if self.markdown:
            # out(), not print(): Markdown's [ ] and | are not rich markup.
            self.console.out(markdown_table(frame, title, float_format), highlight=False)
        else:
            self.console.print(_rich_table(frame, title, float_format))

    def line(self, text: str) -> None:
        self.console.out(text, highlight=False)


def markdown_table(frame: pd.DataFrame, title: str, float_format: str = "{:.3f}") -> str:
    """A GitHub-flavoured Markdown table under its title in bold."""

    def row(values) -> str:
        return "| " + " | ".join(_cell(value, float_format).replace("|", "\\|") for value in values) + " |"

    lines = [f"**{title}**", "", row(frame.columns), "|" + "---|" * len(frame.columns)]
    lines += [row(values) for values in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _rich_table(frame: pd.DataFrame, title: str, float_format: str = "{:.3f}") -> Table:
    view = Table(*[str(column) for column in frame.columns], title=title)
    for row in frame.itertuples(index=False):
        view.add_row(*[_cell(value, float_format) for value in row])
    return view


def _cell(value, float_format: str) -> str:
    return float_format.format(value) if isinstance(value, float) else str(value)
