"""What a researcher reads afterwards: the summary table, its plots, and a look inside any artifact."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from leti.io import ArtifactError, read_json, read_jsonl
from leti.layout import parse_policy
from leti.records import Execution, FeedbackExample, Metrics, Problem, Sample, TrainStep

# Summary metrics named "outcome:{passed, timeout or an exception type}" count samples.
OUTCOME_PREFIX = "outcome:"
SUMMARY_COLUMNS = ["experiment", "policy", "iteration", "dataset", "split", "metric", "value"]


# --- the summary table


def metrics_rows(metrics: Metrics, experiments: Sequence[str]) -> list[dict]:
    """Long-format rows of one metrics.json. The base model's rows are repeated for every arm,
    so that each arm's curve starts at iteration 0."""
    experiment, iteration = parse_policy(metrics.policy)
    arms = [experiment] if experiment is not None else list(experiments)
    values = {
        **metrics.pass_at_k,
        "num_problems": metrics.num_problems,
        "num_samples": metrics.num_samples,
        "mean_completion_tokens": metrics.mean_completion_tokens,
        **{f"{OUTCOME_PREFIX}{name}": count for name, count in metrics.error_types.items()},
    }
    return [
        {
            "experiment": arm,
            "policy": metrics.policy,
            "iteration": iteration,
            "dataset": metrics.dataset,
            "split": metrics.split,
            "metric": name,
            "value": float(value),
        }
        for arm in arms
        for name, value in values.items()
    ]


def summary_table(metrics_paths: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """arm by iteration by dataset by metric, one row each."""
    documents = [read_json(path, Metrics) for path in metrics_paths]
    experiments = sorted({e for d in documents if (e := parse_policy(d.policy)[0]) is not None}) or ["base"]
    rows = [row for document in documents for row in metrics_rows(document, experiments)]
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return table.sort_values(["experiment", "dataset", "split", "iteration", "metric"], ignore_index=True)


def pass_at_k_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per arm and iteration, one column per task set and pass@k."""
    rates = summary[summary["metric"].str.startswith("pass@")].copy()
    rates["column"] = rates["dataset"] + "/" + rates["split"] + " " + rates["metric"]
    return rates.pivot_table(
        index=["experiment", "iteration"], columns="column", values="value"
    ).reset_index()


def outcome_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's outcome counts, with the outcome's name in an `outcome` column."""
    outcomes = summary[summary["metric"].str.startswith(OUTCOME_PREFIX)]
    return outcomes.assign(outcome=outcomes["metric"].str.removeprefix(OUTCOME_PREFIX))


def outcome_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Samples by outcome (passed, timeout or an exception type): one row per task set and
    outcome, one column per policy (base, then each arm's iterations), so that a row reads as
    the shift of that error over the iterations."""
    # The base model's rows are repeated for every arm; count them once.
    outcomes = outcome_rows(summary).drop_duplicates(["policy", "dataset", "split", "metric"])
    outcomes = outcomes.assign(tasks=outcomes["dataset"] + "/" + outcomes["split"])
    table = outcomes.pivot_table(
        index=["tasks", "outcome"], columns="policy", values="value", fill_value=0
    ).astype(int)
    policies = sorted(table.columns, key=_policy_order)
    table = table[policies].reset_index().rename_axis(columns=None)
    # passed first, then the errors from the most common down.
    order = table.assign(_errors=table["outcome"] != "passed", _total=-table[policies].sum(axis=1))
    return table.loc[order.sort_values(["tasks", "_errors", "_total", "outcome"]).index].reset_index(
        drop=True
    )


def _policy_order(policy: str) -> tuple[bool, str, int]:
    experiment, iteration = parse_policy(policy)
    return experiment is not None, experiment or "", iteration


def timing_table(benchmarks: str | os.PathLike[str]) -> pd.DataFrame:
    """Wall time and peak memory of every job, from Snakemake's benchmark files under
    `benchmarks` (benchmarks/{rule}/....tsv or benchmarks/{rule}.tsv): one row per job."""
    root = Path(benchmarks)
    rows = []
    for path in sorted(root.glob("**/*.tsv")):
        job = path.relative_to(root).with_suffix("")
        frame = pd.read_csv(path, sep="\t")
        if frame.empty or "s" not in frame.columns:
            raise ArtifactError(f"{path}: not a Snakemake benchmark file (no 's' column)")
        rows.append(
            {
                "rule": job.parts[0],
                "job": str(job),
                "seconds": float(frame["s"].iloc[-1]),
                "max_rss_mb": pd.to_numeric(frame["max_rss"], errors="coerce").iloc[-1]
                if "max_rss" in frame.columns
                else float("nan"),
            }
        )
    if not rows:
        raise ArtifactError(f"{benchmarks}: no benchmark files (*.tsv) under it")
    return pd.DataFrame(rows)


def rule_times(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per rule: number of jobs, summed and longest wall time, largest peak memory."""
    return (
        jobs.groupby("rule", sort=False)
        .agg(
            jobs=("job", "size"),
            seconds=("seconds", "sum"),
            longest_s=("seconds", "max"),
            max_rss_mb=("max_rss_mb", "max"),
        )
        .sort_values("seconds", ascending=False)
        .reset_index()
    )


def training_logs(paths: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """Steps of every train_log.jsonl, labelled with the policy its folder names (results/{arm}/iter{i}/)."""
    frames = []
    for path in paths:
        folder = Path(path).parent
        steps = read_jsonl(path, TrainStep)
        frame = pd.DataFrame([step.model_dump() for step in steps])
        frame["experiment"], frame["iteration"] = parse_policy(f"{folder.parent.name}/{folder.name}")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# --- plots


def plot_pass_at_k(summary: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    import matplotlib.pyplot as plt

    rates = summary[summary["metric"].str.startswith("pass@")]
    panels = sorted({(d, s, m) for d, s, m in rates[["dataset", "split", "metric"]].itertuples(index=False)})
    figure, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.5), squeeze=False
    )
    for axis, (dataset, split, metric) in zip(axes[0], panels, strict=False):
        panel = rates[(rates["dataset"] == dataset) & (rates["split"] == split) & (rates["metric"] == metric)]
        for experiment, curve in panel.groupby("experiment"):
            curve = curve.sort_values("iteration")
            axis.plot(curve["iteration"], curve["value"], marker="o", label=experiment)
        axis.set(title=f"{dataset}/{split}", xlabel="iteration", ylabel=metric)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.legend()
    _save(figure, path)


def plot_error_types(summary: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    _save(error_types_figure(summary), path)


def error_types_figure(summary: pd.DataFrame):
    """Per arm and task set, the share of samples by outcome at each iteration."""
    import matplotlib.pyplot as plt

    outcomes = outcome_rows(summary)
    groups = sorted(
        {(e, d, s) for e, d, s in outcomes[["experiment", "dataset", "split"]].itertuples(index=False)}
    )
    # One colour per outcome in every panel, passed first: the legend is shared.
    totals = outcomes.groupby("outcome")["value"].sum().sort_values(ascending=False)
    order = ["passed", *(name for name in totals.index if name != "passed")]
    palette = plt.get_cmap("tab20").colors
    colours = {name: palette[index % len(palette)] for index, name in enumerate(order)}
    figure, axes = plt.subplots(
        1, max(len(groups), 1), figsize=(4.5 * max(len(groups), 1), 3.5), squeeze=False
    )
    for axis, (experiment, dataset, split) in zip(axes[0], groups, strict=False):
        group = outcomes[
            (outcomes["experiment"] == experiment)
            & (outcomes["dataset"] == dataset)
            & (outcomes["split"] == split)
        ]
        counts = group.pivot_table(index="iteration", columns="outcome", values="value", fill_value=0)
        counts = counts.reindex(columns=order, fill_value=0)
        shares = counts.div(counts.sum(axis=1), axis=0)
        shares.plot.bar(
            stacked=True, ax=axis, legend=False, width=0.8, color=[colours[name] for name in order]
        )
        axis.set(title=f"{experiment}: {dataset}/{split}", xlabel="iteration", ylabel="share of samples")
    if groups:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[name]) for name in order]
        # Outside the panels, right of the figure; savefig's tight box takes it in.
        figure.legend(handles, order, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    return figure


def plot_training_loss(logs: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    if not logs.empty:
        for (experiment, iteration), steps in logs.groupby(["experiment", "iteration"]):
            axis.plot(steps["step"], steps["loss"], label=f"{experiment} iter {iteration}")
        axis.legend(fontsize="small")
    axis.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    _save(figure, path)


def _save(figure, path: str | os.PathLike[str]) -> None:
    import matplotlib.pyplot as plt

    from leti.io import atomic_path

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def summarize(
    metrics_paths: Sequence[str | os.PathLike[str]],
    train_log_paths: Sequence[str | os.PathLike[str]],
    csv: str | os.PathLike[str],
    pass_at_k_png: str | os.PathLike[str],
    error_types_png: str | os.PathLike[str],
    loss_png: str | os.PathLike[str],
) -> pd.DataFrame:
    import matplotlib

    from leti.io import atomic_path

    matplotlib.use("Agg")
    summary = summary_table(metrics_paths)
    with atomic_path(csv) as tmp:
        summary.to_csv(tmp, index=False)
    plot_pass_at_k(summary, pass_at_k_png)
    plot_error_types(summary, error_types_png)
    plot_training_loss(training_logs(train_log_paths), loss_png)
    return summary


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
    table = Table("metric", "value")
    for name, value in metrics.pass_at_k.items():
        table.add_row(name, f"{value:.4f}")
    table.add_row("problems", str(metrics.num_problems))
    table.add_row("samples", str(metrics.num_samples))
    table.add_row("mean completion tokens", f"{metrics.mean_completion_tokens:.1f}")
    console.print(table)
    _print_counts(pd.Series(metrics.error_types), "outcome", console)


def print_summary(results: str | os.PathLike[str], console: Console) -> None:
    """The arm by iteration pass@k table of every metrics.json under `results`."""
    paths = sorted(Path(results).glob("**/eval/*/*/metrics.json"))
    if not paths:
        raise ArtifactError(f"{results}: no metrics.json found under it")
    summary = summary_table(paths)
    console.print(_rich_table(pass_at_k_table(summary), "pass@k"))
    outcomes = outcome_table(summary)
    for tasks, table in outcomes.groupby("tasks", sort=False):
        console.print(_rich_table(table.drop(columns="tasks"), f"{tasks}: samples by outcome"))


def print_timings(benchmarks: str | os.PathLike[str], console: Console) -> None:
    """Per-rule wall times and peak memory of the jobs benchmarked under `benchmarks`."""
    rules = rule_times(timing_table(benchmarks))
    console.print(_rich_table(rules, "jobs by rule", float_format="{:.0f}"))
    console.print(
        f"{rules['jobs'].sum()} jobs, {rules['seconds'].sum() / 60:.1f} min of job wall time in all"
    )


def _rich_table(frame: pd.DataFrame, title: str, float_format: str = "{:.3f}") -> Table:
    view = Table(*[str(column) for column in frame.columns], title=title)
    for row in frame.itertuples(index=False):
        view.add_row(
            *[float_format.format(value) if isinstance(value, float) else str(value) for value in row]
        )
    return view
