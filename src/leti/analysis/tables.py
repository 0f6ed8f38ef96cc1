"""The summary table and the tables read from it: pass@k, outcomes, shares, the reward-token probe,
each update against what it did, job times. Below both the plots and the reports, which read them."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from leti.analysis.comparisons import PROBE_METRIC, generation_shift_ratios
from leti.evaluate import OTHER_ERROR, SHARE_PREFIX, TRACKED_ERRORS
from leti.io import ArtifactError, read_json, read_jsonl
from leti.layout import BASE_POLICY, parse_policy, policy_name
from leti.records import Estimate, GenerationProbe, Metrics, Probe, TrainStep

# Summary metrics named "outcome:{passed, timeout or an exception type}" count samples.
OUTCOME_PREFIX = "outcome:"
# Summary metrics of the reward-token probe (purpose "probe"): good, bad, good_minus_bad, ...
PROBE_PREFIX = "probe:"
# Of the probe as generated: the likelihood after <|good|>, and the share of the update generation keeps.
GENERATION_GOOD = f"{PROBE_PREFIX}generation_good"
GENERATION_SHIFT_RATIO = f"{PROBE_PREFIX}generation_shift_ratio"
SUMMARY_COLUMNS = [
    "experiment",
    "policy",
    "iteration",
    "optimizer_steps",
    "training_tokens",
    "purpose",
    "reward_prefix",
    "dataset",
    "split",
    "metric",
    "value",
    "ci_low",
    "ci_high",
]


# --- the summary table


def metrics_rows(
    metrics: Metrics, experiments: Sequence[str], training: dict[str, tuple[int, int]]
) -> list[dict]:
    """Long-format rows of one metrics.json, each statistic with its CI where it has one."""
    values: dict[str, float] = {
        **metrics.pass_at_k,
        **metrics.task_metrics,
        **{name: estimate.value for name, estimate in metrics.estimates.items()},
        "num_problems": metrics.num_problems,
        "num_samples": metrics.num_samples,
        "mean_completion_tokens": metrics.mean_completion_tokens,
        **{f"{OUTCOME_PREFIX}{name}": count for name, count in metrics.error_types.items()},
    }
    where = (metrics.policy, metrics.purpose, metrics.reward_prefix, metrics.dataset, metrics.split)
    return long_rows(*where, values, metrics.estimates, experiments, training)


def probe_rows(probe: Probe, experiments: Sequence[str], training: dict[str, tuple[int, int]]) -> list[dict]:
    """Long-format rows of one probe.json (purpose "probe", metrics "probe:..."), with their CIs."""
    estimates = {f"{PROBE_PREFIX}{name}": estimate for name, estimate in probe.estimates.items()}
    values: dict[str, float] = {
        **{name: estimate.value for name, estimate in estimates.items()},
        f"{PROBE_PREFIX}embedding_distance": probe.embedding_distance,
        f"{PROBE_PREFIX}embedding_row_norm": probe.embedding_row_norm,
        "num_problems": probe.num_problems,
    }
    if probe.p_value is not None:
        values[f"{PROBE_PREFIX}p_value"] = probe.p_value
    where = (probe.policy, "probe", "none", probe.dataset, probe.split)
    return long_rows(*where, values, estimates, experiments, training)


def generation_probe_rows(
    probes: Sequence[Probe],
    generation_probes: Sequence[GenerationProbe],
    experiments: Sequence[str],
    training: dict[str, tuple[int, int]],
) -> list[dict]:
    """Long-format rows (purpose "probe") of the probe as generated: every policy's likelihood after
    <|good|>, and each trained policy's generation / float32 shift ratio, with their CIs."""
    estimates = {
        (probe.policy, probe.dataset, probe.split, GENERATION_GOOD): probe.estimates["good"]
        for probe in generation_probes
        if "good" in probe.estimates
    }
    estimates |= {
        (*key, GENERATION_SHIFT_RATIO): ratio
        for key, ratio in generation_shift_ratios(probes, generation_probes).items()
    }
    return [
        row
        for (policy, dataset, split, name), estimate in estimates.items()
        for row in long_rows(
            policy,
            "probe",
            "none",
            dataset,
            split,
            {name: estimate.value},
            {name: estimate},
            experiments,
            training,
        )
    ]


def long_rows(
    policy: str,
    purpose: str,
    reward_prefix: str,
    dataset: str,
    split: str,
    values: dict[str, float],
    estimates: dict[str, Estimate],
    experiments: Sequence[str],
    training: dict[str, tuple[int, int]],
) -> list[dict]:
    """One summary row per value. The base model's rows are repeated for every arm, so that each
    arm's curve starts at iteration 0."""
    experiment, iteration = parse_policy(policy)
    arms = [experiment] if experiment is not None else list(experiments)
    steps, tokens = training.get(policy, (math.nan, math.nan))
    return [
        {
            "experiment": arm,
            "policy": policy,
            "iteration": iteration,
            "optimizer_steps": steps,
            "training_tokens": tokens,
            "purpose": purpose,
            "reward_prefix": reward_prefix,
            "dataset": dataset,
            "split": split,
            "metric": name,
            "value": float(value),
            "ci_low": estimate.ci_low if (estimate := estimates.get(name)) else math.nan,
            "ci_high": estimate.ci_high if estimate else math.nan,
        }
        for arm in arms
        for name, value in values.items()
    ]


def training_progress(train_log_paths: Iterable[str | os.PathLike[str]]) -> dict[str, tuple[int, int]]:
    """Per policy, the optimizer steps and training tokens from the base model to it (the
    paper's x-axis): its own iteration's and every earlier iteration's of its arm."""
    logs = training_logs(train_log_paths)
    progress: dict[str, tuple[int, int]] = {BASE_POLICY: (0, 0)}
    if logs.empty:
        return progress
    per_iteration = logs.groupby(["experiment", "iteration"]).agg(
        steps=("step", "size"), tokens=("tokens", "sum")
    )
    for experiment, arm in per_iteration.groupby(level="experiment"):
        cumulative = arm.sort_index().cumsum()
        for (_, iteration), row in cumulative.iterrows():
            progress[policy_name(experiment, iteration)] = (int(row["steps"]), int(row["tokens"]))
    return progress


def read_metrics(paths: Iterable[str | os.PathLike[str]]) -> list[Metrics]:
    return [read_json(path, Metrics) for path in paths]


def metrics_under(results: str | os.PathLike[str]) -> list[Metrics]:
    """Every metrics.json under a results folder."""
    paths = sorted(Path(results).glob("**/metrics.json"))
    if not paths:
        raise ArtifactError(f"{results}: no metrics.json found under it")
    return read_metrics(paths)


def read_probes(paths: Iterable[str | os.PathLike[str]]) -> list[Probe]:
    return [read_json(path, Probe) for path in paths]


def read_generation_probes(paths: Iterable[str | os.PathLike[str]]) -> list[GenerationProbe]:
    return [read_json(path, GenerationProbe) for path in paths]


def summary_table(
    documents: Sequence[Metrics],
    train_log_paths: Iterable[str | os.PathLike[str]] = (),
    probes: Sequence[Probe] = (),
    generation_probes: Sequence[GenerationProbe] = (),
) -> pd.DataFrame:
    """arm by iteration by purpose by task set by metric, one row each."""
    policies = [d.policy for d in documents] + [probe.policy for probe in [*probes, *generation_probes]]
    experiments = sorted({e for policy in policies if (e := parse_policy(policy)[0]) is not None}) or ["base"]
    training = training_progress(train_log_paths)
    rows = [row for document in documents for row in metrics_rows(document, experiments, training)]
    rows += [row for probe in probes for row in probe_rows(probe, experiments, training)]
    rows += generation_probe_rows(probes, generation_probes, experiments, training)
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return table.sort_values(
        ["experiment", "purpose", "dataset", "split", "iteration", "reward_prefix", "metric"],
        ignore_index=True,
    )


def evaluations(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["purpose"] == "eval"]


def with_ci(value: float, low: float, high: float, number: str = ".3f") -> str:
    """A value and its 95% CI as one cell: "0.406 [0.250, 0.594]"."""
    if math.isnan(low):
        return f"{value:{number}}"
    return f"{value:{number}} [{low:{number}}, {high:{number}}]"


def labelled(summary: pd.DataFrame) -> pd.DataFrame:
    """Adds `label`: the policy, and its reward prefix too when trained policies were evaluated
    with more than one."""
    trained = summary[summary["policy"] != BASE_POLICY]
    several = trained.groupby("policy")["reward_prefix"].nunique().gt(1).any() if not trained.empty else False
    label = summary["policy"]
    if several:
        label = label.where(summary["policy"] == BASE_POLICY, label + " <" + summary["reward_prefix"] + ">")
    return summary.assign(label=label)


def pass_at_k_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per arm, iteration and reward prefix: the optimizer steps so far, each task set's
    pass@k with its CI, and the pass rate of the policy's own rollouts."""
    rates = summary[summary["metric"].str.startswith("pass@")].copy()
    rates["column"] = rates["dataset"] + "/" + rates["split"] + " " + rates["metric"]
    rates["column"] = rates["column"].where(rates["purpose"] == "eval", "rollouts " + rates["column"])
    rates["cell"] = [with_ci(*row) for row in rates[["value", "ci_low", "ci_high"]].itertuples(index=False)]
    evaluated = rates[rates["purpose"] == "eval"]
    table = evaluated.pivot_table(
        index=["experiment", "iteration", "reward_prefix"], columns="column", values="cell", aggfunc="first"
    )
    rollouts = rates[rates["purpose"] == "rollouts"].pivot_table(
        index=["experiment", "iteration"], columns="column", values="cell", aggfunc="first"
    )
    if not rollouts.empty:
        table = table.join(rollouts, on=["experiment", "iteration"])
    steps = evaluated.groupby(["experiment", "iteration", "reward_prefix"])["optimizer_steps"].first()
    table.insert(0, "steps", steps.map(lambda value: "-" if math.isnan(value) else str(int(value))))
    return table.reset_index().rename_axis(columns=None).fillna("-")


def probe_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per probed policy and task set: the reward-token probe's good - bad with its CI and
    p-value, the likelihood after <|good|>, how far apart the two tokens' embedding rows are, and
    (trained policies) the share of the update's shift that the policy keeps as generation runs it."""
    probes = summary[summary["purpose"] == "probe"].drop_duplicates(["policy", "dataset", "split", "metric"])
    if probes.empty:
        return pd.DataFrame()
    cells = probes.assign(
        tasks=probes["dataset"] + "/" + probes["split"],
        cell=[
            with_ci(value, low, high, number=".3f" if metric == GENERATION_SHIFT_RATIO else "+.4f")
            for metric, value, low, high in probes[["metric", "value", "ci_low", "ci_high"]].itertuples(
                index=False
            )
        ],
    ).pivot_table(index=["tasks", "policy"], columns="metric", values="cell", aggfunc="first")
    values = probes.assign(tasks=probes["dataset"] + "/" + probes["split"]).pivot_table(
        index=["tasks", "policy"], columns="metric", values="value", aggfunc="first"
    )
    table = pd.DataFrame(
        {
            "problems": values["num_problems"].astype(int),
            "good - bad (nats/token)": cells.get(f"{PROBE_PREFIX}good_minus_bad"),
            "p": values.get(f"{PROBE_PREFIX}p_value"),
            "after good": cells.get(f"{PROBE_PREFIX}good"),
            "embedding distance / row norm": (
                values[f"{PROBE_PREFIX}embedding_distance"] / values[f"{PROBE_PREFIX}embedding_row_norm"]
            ),
            "shift as generated / float32 [95% CI]": cells.get(GENERATION_SHIFT_RATIO),
        }
    )
    order = sorted(table.index, key=lambda key: (key[0], *_policy_order(key[1])))
    return table.loc[order].reset_index().fillna("-")


def update_table(comparisons: pd.DataFrame, logs: pd.DataFrame) -> pd.DataFrame:
    """One row per trained policy: its own iteration's optimizer steps and training loss at the end
    (the mean over the last quarter of those steps), then per task set its pass@1 minus the base
    model's (under <|good|> where it was evaluated under several prefixes) and the probe's good - bad,
    each with its paired 95% CI, p-value and Benjamini-Hochberg adjusted p. Across the arms of a
    sweep: what each update cost against what its reward token learned."""
    passes = comparisons[(comparisons["kind"] == "vs_base") & (comparisons["metric"] == "pass@1")]
    passes = passes.sort_values("reward_prefix_a", key=lambda prefix: prefix != "good", kind="stable")
    passes = passes.drop_duplicates(["policy_a", "dataset", "split"])
    probes = comparisons[
        (comparisons["kind"] == "probe_good_vs_bad")
        & (comparisons["metric"] == PROBE_METRIC)
        & (comparisons["policy_a"] != BASE_POLICY)
    ]
    columns: dict[str, pd.Series] = {}
    for rows, name, number in [(passes, "pass@1 - base", "+.3f"), (probes, "good - bad", "+.4f")]:
        for (dataset, split), group in rows.groupby(["dataset", "split"]):
            group = group.set_index("policy_a")
            cells = [
                with_ci(*row, number=number)
                for row in group[["difference", "ci_low", "ci_high"]].itertuples(index=False)
            ]
            columns[f"{dataset}/{split} {name} [95% CI]"] = pd.Series(cells, index=group.index)
            p_cells = [
                f"{p:.3g} ({q:.3g})" for p, q in zip(group["p_value"], group["p_adjusted"], strict=True)
            ]
            columns[f"{dataset}/{split} {name} p (BH)"] = pd.Series(p_cells, index=group.index)
    table = training_ends(logs).join(pd.DataFrame(columns), how="outer")
    order = sorted(table.index, key=_policy_order)
    return table.loc[order].rename_axis("policy").reset_index().fillna("-")


def training_ends(logs: pd.DataFrame) -> pd.DataFrame:
    """Per trained policy (the index): its own iteration's optimizer steps, and the mean loss of the
    last quarter of them (at least one), as cells."""
    rows = {}
    if not logs.empty:
        for (experiment, iteration), steps in logs.groupby(["experiment", "iteration"]):
            losses = steps.sort_values("step")["loss"]
            rows[policy_name(experiment, iteration)] = {
                "steps": str(len(losses)),
                "loss at the end": f"{losses.tail(math.ceil(len(losses) / 4)).mean():.3f}",
            }
    return pd.DataFrame.from_dict(rows, orient="index", columns=["steps", "loss at the end"])


def outcome_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The evaluations' outcome counts, with the outcome's name in an `outcome` column."""
    outcomes = evaluations(summary)
    outcomes = outcomes[outcomes["metric"].str.startswith(OUTCOME_PREFIX)]
    return outcomes.assign(outcome=outcomes["metric"].str.removeprefix(OUTCOME_PREFIX))


def outcome_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Samples by outcome (passed, timeout or an exception type): one row per task set and
    outcome, one column per policy (base, then each arm's iterations), so that a row reads as
    the shift of that error over the iterations."""
    # The base model's rows are repeated for every arm; count them once.
    outcomes = labelled(outcome_rows(summary)).drop_duplicates(["label", "dataset", "split", "metric"])
    outcomes = outcomes.assign(tasks=outcomes["dataset"] + "/" + outcomes["split"])
    table = outcomes.pivot_table(index=["tasks", "outcome"], columns="label", values="value")
    # An outcome an evaluation never had counts 0; a policy not evaluated on a task set stays empty.
    for tasks, labels in outcomes.groupby("tasks")["label"].agg(lambda labels: sorted(set(labels))).items():
        table.loc[tasks, labels] = table.loc[tasks, labels].fillna(0).to_numpy()
    table = table.astype("Int64")
    policies = sorted(table.columns, key=_label_order)
    table = table[policies].reset_index().rename_axis(columns=None)
    # passed first, then the errors from the most common down.
    order = table.assign(_errors=table["outcome"] != "passed", _total=-table[policies].sum(axis=1))
    return table.loc[order.sort_values(["tasks", "_errors", "_total", "outcome"]).index].reset_index(
        drop=True
    )


def share_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The shares of passed, NameError, SyntaxError and other errors among the evaluation samples,
    with CIs: one row per task set and outcome, one column per policy."""
    names = [f"{SHARE_PREFIX}{name}" for name in ("passed", *TRACKED_ERRORS, OTHER_ERROR)]
    shares = labelled(evaluations(summary))
    shares = shares[shares["metric"].isin(names)].drop_duplicates(["label", "dataset", "split", "metric"])
    shares = shares.assign(
        tasks=shares["dataset"] + "/" + shares["split"],
        outcome=shares["metric"].str.removeprefix(SHARE_PREFIX),
        cell=[with_ci(*row) for row in shares[["value", "ci_low", "ci_high"]].itertuples(index=False)],
    )
    table = shares.pivot_table(index=["tasks", "outcome"], columns="label", values="cell", aggfunc="first")
    table = table[sorted(table.columns, key=_label_order)]
    order = {name.removeprefix(SHARE_PREFIX): index for index, name in enumerate(names)}
    return (
        table.reset_index()
        .rename_axis(columns=None)
        .sort_values(["tasks", "outcome"], key=lambda c: c.map(order) if c.name == "outcome" else c)
        .reset_index(drop=True)
    )


def _label_order(label: str) -> tuple[bool, str, int, str]:
    policy, _, prefix = label.partition(" ")
    return (*_policy_order(policy), prefix)


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
