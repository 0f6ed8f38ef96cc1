"""The summary's figures: pass@k by iteration, sample efficiency, outcome shares, training loss, and
each policy against the base model beside its reward-token probe."""

from __future__ import annotations

import os

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from leti.analysis.tables import evaluations, outcome_rows
from leti.io import atomic_path
from leti.layout import BASE_POLICY

# Files, never a window: summaries are written by batch jobs.
matplotlib.use("Agg")


def primary_evaluations(summary: pd.DataFrame) -> pd.DataFrame:
    """The evaluations under one reward prefix per policy: `good` where trained policies have it
    (LETI's own setting), else the one they have."""
    rows = evaluations(summary)
    trained = rows["policy"] != BASE_POLICY
    prefixes = set(rows.loc[trained, "reward_prefix"])
    primary = "good" if "good" in prefixes or not prefixes else sorted(prefixes)[0]
    return rows[~trained | (rows["reward_prefix"] == primary)]


def plot_pass_at_k(summary: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """pass@k (and a task's F1 scores) by iteration, with 95% CIs; a dashed line for every
    other reward prefix a policy was evaluated with."""
    rows = evaluations(summary)
    shown = rows[rows["metric"].str.startswith("pass@") | rows["metric"].isin(_f1_names(rows))]
    _save(_curves_figure(shown, "iteration", "iteration"), path)


def plot_sample_efficiency(summary: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """pass@1 (and a task's F1) with 95% CIs against the optimizer steps taken since the base
    model: the paper's measure of how fast each kind of feedback teaches."""
    rows = primary_evaluations(summary)
    shown = rows[(rows["metric"] == "pass@1") | rows["metric"].isin(_f1_names(rows))]
    _save(_curves_figure(shown, "optimizer_steps", "optimizer steps (cumulative)"), path)


def _f1_names(rows: pd.DataFrame) -> set[str]:
    """A task metric's F1 scores (EAE's arg_i_f1, arg_c_f1), plotted beside pass@k."""
    return {metric for metric in rows["metric"] if metric.endswith("_f1")}


def _curves_figure(rows: pd.DataFrame, x: str, xlabel: str):
    """One panel per task set and metric, one line per arm and reward prefix, with CI bars."""
    panels = sorted({(d, s, m) for d, s, m in rows[["dataset", "split", "metric"]].itertuples(index=False)})
    figure, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.5), squeeze=False
    )
    for axis, (dataset, split, metric) in zip(axes[0], panels, strict=False):
        panel = rows[(rows["dataset"] == dataset) & (rows["split"] == split) & (rows["metric"] == metric)]
        curves = list(_arm_curves(panel))
        # One colour per arm; its other reward prefixes are dashed lines of the same colour.
        arms = sorted({experiment for (experiment, _), _ in curves})
        colours = {arm: plt.get_cmap("tab10")(index % 10) for index, arm in enumerate(arms)}
        # Lines share their x values: shift each a little sideways so that the CI bars stay apart.
        span = float(panel[x].max() - panel[x].min()) or 1.0
        for index, ((experiment, prefix), curve) in enumerate(curves):
            curve = curve.sort_values(x)
            errors = [curve["value"] - curve["ci_low"], curve["ci_high"] - curve["value"]]
            axis.errorbar(
                curve[x] + (index - (len(curves) - 1) / 2) * 0.015 * span,
                curve["value"],
                yerr=[error.fillna(0).clip(lower=0) for error in errors],
                marker="o",
                capsize=3,
                color=colours[experiment],
                linestyle="-" if prefix in ("good", "none") else "--",
                label=experiment if prefix in ("good", "none") else f"{experiment} <{prefix}>",
            )
        axis.set(title=f"{dataset}/{split}", xlabel=xlabel, ylabel=f"{metric} (95% CI)")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.legend(fontsize="small")
    return figure


def _arm_curves(panel: pd.DataFrame):
    """(arm, reward prefix) and its points, each starting at the base model."""
    base = panel[panel["policy"] == BASE_POLICY]
    trained = panel[panel["policy"] != BASE_POLICY]
    for (experiment, prefix), points in trained.groupby(["experiment", "reward_prefix"]):
        yield (experiment, prefix), pd.concat([base[base["experiment"] == experiment], points])
    if trained.empty:
        for experiment, points in base.groupby("experiment"):
            yield (experiment, "none"), points


def plot_error_types(summary: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    _save(error_types_figure(summary), path)


def error_types_figure(summary: pd.DataFrame):
    """Per arm and task set, the share of samples by outcome at each iteration."""
    outcomes = outcome_rows(primary_evaluations(summary))
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


# The panels of the reward-probe figure: (comparison kind, metric, what the axis shows).
PROBE_PANELS = (
    ("vs_base", "pass@1", "pass@1 - base"),
    ("probe_good_vs_bad", "loglik_per_token", "probe: good - bad (nats/token)"),
    ("probe_vs_base", "loglik_per_token", "probe: good - base (nats/token)"),
)


def plot_reward_probe(comparisons: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Per trained policy, with 95% CIs: pass@1 against the base model (under <|good|>), the probe's
    good - bad, and the reference solutions' likelihood against the base model's. With the arms of a
    sweep, this is the sweep's curve: what each setting costs against what its reward token learned."""
    rows = comparisons[comparisons["policy_a"] != BASE_POLICY]
    rows = rows[(rows["kind"] != "vs_base") | (rows["reward_prefix_a"] == "good")]
    panels = [
        (kind, metric, label, dataset, split)
        for kind, metric, label in PROBE_PANELS
        for dataset, split in sorted(
            set(
                rows.loc[
                    (rows["kind"] == kind) & (rows["metric"] == metric), ["dataset", "split"]
                ].itertuples(index=False)
            )
        )
    ]
    policies = sorted(set(rows["policy_a"]), reverse=True)
    figure, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 1.2 + 0.35 * max(len(policies), 1)),
        squeeze=False, sharey=True,
    )  # fmt: skip
    for axis, (kind, metric, label, dataset, split) in zip(axes[0], panels, strict=False):
        panel = rows[
            (rows["kind"] == kind)
            & (rows["metric"] == metric)
            & (rows["dataset"] == dataset)
            & (rows["split"] == split)
        ]
        panel = panel.set_index("policy_a").reindex(policies)
        errors = [panel["difference"] - panel["ci_low"], panel["ci_high"] - panel["difference"]]
        axis.errorbar(panel["difference"], range(len(policies)), xerr=errors, fmt="o", capsize=3)
        axis.axvline(0, color="grey", linewidth=0.8)
        axis.set(title=f"{dataset}/{split}", xlabel=label, yticks=range(len(policies)), yticklabels=policies)
    _save(figure, path)


def plot_training_loss(logs: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if not logs.empty:
        for (experiment, iteration), steps in logs.groupby(["experiment", "iteration"]):
            axis.plot(steps["step"], steps["loss"], label=f"{experiment} iter {iteration}")
        axis.legend(fontsize="small")
    axis.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    _save(figure, path)


def _save(figure, path: str | os.PathLike[str]) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
