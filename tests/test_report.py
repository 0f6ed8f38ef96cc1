from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from leti.analysis.comparisons import COMPARISON_COLUMNS
from leti.analysis.plots import error_types_figure
from leti.analysis.report import SummaryOutputs, markdown_table, summarize
from leti.analysis.tables import (
    SUMMARY_COLUMNS,
    outcome_table,
    pass_at_k_table,
    probe_table,
    read_metrics,
    rule_times,
    share_table,
    summary_table,
    timing_table,
    training_logs,
    update_table,
)
from leti.config import MetricsSettings
from leti.evaluate import compute_metrics
from leti.io import write_json, write_jsonl
from leti.probe import probe_summary
from leti.records import (
    Estimate,
    Execution,
    ExecutionStatus,
    FeedbackExample,
    GenerationProbe,
    GenerationProbeProblem,
    Metrics,
    Probe,
    ProbeProblem,
    Problem,
    Sample,
    TrainStep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics(
    policy: str, iteration: int, rate: float, dataset: str = "mbpp", prefix: str = "good", problems: int = 10
) -> Metrics:
    """An evaluation in which the first rate * problems problems pass and the rest fail an assert."""
    solved = round(rate * problems)
    task_ids = [f"{dataset}/{index}" for index in range(problems)]
    executions = [
        Execution(
            task_id=task_id,
            sample_index=0,
            status=ExecutionStatus.passed if index < solved else ExecutionStatus.failed,
            exception_type=None if index < solved else "AssertionError",
            duration_s=0.1,
        )
        for index, task_id in enumerate(task_ids)
    ]
    samples = [
        Sample(
            task_id=task_id,
            completion="c",
            policy_iteration=iteration,
            sample_index=0,
            seed=0,
            prompt_tokens=1,
            completion_tokens=40,
            finish_reason="eos",
        )
        for task_id in task_ids
    ]
    tasks = [Problem(task_id=t, dataset=dataset, split="test", prompt="p", test_code="t") for t in task_ids]
    settings = MetricsSettings(reward_prefix="none" if iteration == 0 else prefix)
    return compute_metrics(tasks, samples, executions, settings, policy)


def eval_path(root: Path, policy: str, prefix: str = "good", dataset: str = "mbpp") -> Path:
    purpose = "eval-none" if policy == "base" else f"eval-{prefix}"
    return root / policy / purpose / dataset / "test" / "metrics.json"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    documents = {
        "base": metrics("base", 0, 0.3),
        "textual/iter1": metrics("textual/iter1", 1, 0.4),
        "binary/iter1": metrics("binary/iter1", 1, 0.2),
    }
    for policy, document in documents.items():
        write_json(eval_path(root, policy), document)
    for arm in ("textual", "binary"):
        steps = [
            TrainStep(step=i, epoch=0, loss=2.0 / i, learning_rate=1e-4, tokens=100, tokens_per_s=50)
            for i in (1, 2)
        ]
        write_jsonl(root / arm / "iter1" / "train_log.jsonl", steps)
    return root


def summarize_into(results: Path, folder: Path) -> tuple[pd.DataFrame, SummaryOutputs]:
    outputs = SummaryOutputs(
        csv=folder / "summary.csv",
        comparisons=folder / "comparisons.csv",
        pass_at_k_png=folder / "pass.png",
        sample_efficiency_png=folder / "efficiency.png",
        error_types_png=folder / "errors.png",
        loss_png=folder / "loss.png",
        reward_probe_png=folder / "probe.png",
    )
    summary = summarize(
        sorted(results.glob("**/metrics.json")),
        sorted(results.glob("**/train_log.jsonl")),
        outputs,
        sorted(results.glob("**/probe.json")),
        sorted(results.glob("**/generation.json")),
    )
    return summary, outputs


def test_summary_has_one_row_per_arm_iteration_dataset_and_metric(results: Path, tmp_path: Path) -> None:
    summary, outputs = summarize_into(results, tmp_path)
    plots = [outputs.pass_at_k_png, outputs.sample_efficiency_png, outputs.error_types_png, outputs.loss_png]
    plots.append(outputs.reward_probe_png)
    assert all(plot.read_bytes().startswith(PNG_MAGIC) for plot in plots)
    written = pd.read_csv(outputs.csv)
    assert list(written.columns) == SUMMARY_COLUMNS
    assert len(written) == len(summary)
    rates = written[written["metric"] == "pass@1"].set_index(["experiment", "iteration"])
    # The base model is iteration 0 of every arm.
    assert rates["value"].to_dict() == {
        ("binary", 0): 0.3,
        ("binary", 1): 0.2,
        ("textual", 0): 0.3,
        ("textual", 1): 0.4,
    }
    assert (rates["ci_low"] <= rates["value"]).all() and (rates["value"] <= rates["ci_high"]).all()
    # Each iteration-1 policy took 2 optimizer steps of 100 tokens.
    assert rates["optimizer_steps"].to_dict() == {
        ("binary", 0): 0,
        ("binary", 1): 2,
        ("textual", 0): 0,
        ("textual", 1): 2,
    }
    assert rates.loc[("textual", 1), "training_tokens"] == 200
    outcomes = written[written["metric"] == "outcome:AssertionError"]
    assert set(outcomes["value"]) == {7.0, 6.0, 8.0}
    table = pass_at_k_table(summary)
    assert list(table.columns) == ["experiment", "iteration", "reward_prefix", "steps", "mbpp/test pass@1"]
    assert len(table) == 4
    assert table["mbpp/test pass@1"].str.fullmatch(r"0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]").all()
    outcomes = outcome_table(summary)
    assert list(outcomes.columns) == ["tasks", "outcome", "base", "binary/iter1", "textual/iter1"]
    assert outcomes.values.tolist() == [
        ["mbpp/test", "passed", 3, 2, 4],
        ["mbpp/test", "AssertionError", 7, 8, 6],
    ]
    shares = share_table(summary)
    assert shares["outcome"].tolist() == ["passed", "NameError", "SyntaxError", "other_error"]
    assert shares.loc[0, "textual/iter1"].startswith("0.400 [")


def test_comparisons_pair_every_policy_with_the_base_and_the_arms(results: Path, tmp_path: Path) -> None:
    _, outputs = summarize_into(results, tmp_path)
    comparisons = pd.read_csv(outputs.comparisons)
    assert list(comparisons.columns) == COMPARISON_COLUMNS
    pairs = comparisons[["kind", "policy_a", "policy_b"]].values.tolist()
    assert pairs == [
        ["vs_base", "binary/iter1", "base"],
        ["vs_base", "textual/iter1", "base"],
        ["arm_vs_arm", "binary/iter1", "textual/iter1"],
    ]
    # textual solves problems 0-3, binary 0-1: two discordant problems, both textual's.
    arms = comparisons.iloc[2]
    assert arms["difference"] == pytest.approx(-0.2)
    assert arms["p_value"] == pytest.approx(0.5)
    assert arms["ci_low"] <= -0.2 <= arms["ci_high"]
    assert (comparisons["num_problems"] == 10).all()


def test_p_values_are_adjusted_within_each_family_of_comparisons(results: Path, tmp_path: Path) -> None:
    for arm, rate in [("full", 0.9), ("lora", 0.8), ("slow", 0.4)]:
        write_json(eval_path(results, f"{arm}/iter1"), metrics(f"{arm}/iter1", 1, rate))
    _, outputs = summarize_into(results, tmp_path)
    comparisons = pd.read_csv(outputs.comparisons)
    family = comparisons[(comparisons["kind"] == "vs_base") & (comparisons["metric"] == "pass@1")]
    assert len(family) == 5
    expected = scipy_stats.false_discovery_control(family["p_value"].to_numpy(), method="bh")
    assert family["p_adjusted"].to_numpy() == pytest.approx(expected)
    assert (family["p_adjusted"] >= family["p_value"]).all()
    assert (family["p_adjusted"] > family["p_value"]).any()
    shown = leti("summary", str(results), "--markdown")
    assert shown.returncode == 0, shown.stderr
    assert "| p (BH) |" in shown.stdout
    # A comparisons.csv an earlier version wrote, without p_adjusted, is recomputed, not misread.
    comparisons.drop(columns="p_adjusted").to_csv(results / "comparisons.csv", index=False)
    shown = leti("summary", str(results), "--markdown")
    assert shown.returncode == 0, shown.stderr
    assert "| p (BH) |" in shown.stdout


def test_good_and_bad_prefixes_are_compared_per_policy(results: Path, tmp_path: Path) -> None:
    write_json(eval_path(results, "textual/iter1", "bad"), metrics("textual/iter1", 1, 0.1, prefix="bad"))
    summary, outputs = summarize_into(results, tmp_path)
    comparisons = pd.read_csv(outputs.comparisons)
    contrast = comparisons[comparisons["kind"] == "good_vs_bad"]
    assert contrast[["policy_a", "reward_prefix_a", "reward_prefix_b"]].values.tolist() == [
        ["textual/iter1", "good", "bad"]
    ]
    assert contrast["difference"].iloc[0] == pytest.approx(0.3)
    # The bad-prefix evaluation is a row of its own in the pass@k table and a column of its own by outcome.
    assert len(pass_at_k_table(summary)) == 5
    assert "textual/iter1 <bad>" in outcome_table(summary).columns


def probe(policy: str, shift: float, problems: int = 12) -> Probe:
    """A probe in which every problem's solution is `shift` nats/token more likely after <|good|>."""
    scored = [
        ProbeProblem(
            task_id=f"mbpp/{index}", tokens=20, good=-1.0 + 0.01 * index + shift, bad=-1.0 + 0.01 * index
        )
        for index in range(problems)
    ]
    estimates, p_value, test = probe_summary(scored)
    return Probe(
        dataset="mbpp", split="test", policy=policy, policy_iteration=0 if policy == "base" else 1,
        num_problems=problems, embedding_distance=10 * shift, embedding_row_norm=0.5,
        estimates=estimates, p_value=p_value, test=test, problems=scored,
    )  # fmt: skip


def test_probes_are_summarised_and_compared(results: Path, tmp_path: Path) -> None:
    for policy, shift in [("base", 0.0), ("textual/iter1", 0.01), ("binary/iter1", 0.002)]:
        write_json(results / policy / "probe" / "mbpp" / "test" / "probe.json", probe(policy, shift))
    summary, outputs = summarize_into(results, tmp_path)
    written = pd.read_csv(outputs.csv)
    probed = written[(written["purpose"] == "probe") & (written["metric"] == "probe:good_minus_bad")]
    assert probed.set_index(["experiment", "policy"])["value"].round(6).to_dict() == {
        ("binary", "base"): 0.0,
        ("textual", "base"): 0.0,
        ("binary", "binary/iter1"): 0.002,
        ("textual", "textual/iter1"): 0.01,
    }
    assert written.loc[written["metric"] == "probe:embedding_distance", "value"].max() == pytest.approx(0.1)
    # The probe's rows leave the evaluation tables alone.
    assert len(pass_at_k_table(summary)) == 4

    comparisons = pd.read_csv(outputs.comparisons)
    rows = comparisons[comparisons["metric"] == "loglik_per_token"]
    assert rows[["kind", "policy_a", "reward_prefix_a", "policy_b", "reward_prefix_b"]].values.tolist() == [
        ["probe_good_vs_bad", "base", "good", "base", "bad"],
        ["probe_good_vs_bad", "binary/iter1", "good", "binary/iter1", "bad"],
        ["probe_good_vs_bad", "textual/iter1", "good", "textual/iter1", "bad"],
        ["probe_vs_base", "binary/iter1", "good", "base", "good"],
        ["probe_vs_base", "textual/iter1", "good", "base", "good"],
    ]
    textual = rows[(rows["kind"] == "probe_good_vs_bad") & (rows["policy_a"] == "textual/iter1")].iloc[0]
    assert textual["difference"] == pytest.approx(0.01)
    assert textual["p_value"] < 0.01 and textual["num_problems"] == 12
    assert rows.iloc[0]["p_value"] == 1.0
    assert outputs.reward_probe_png.read_bytes().startswith(PNG_MAGIC)

    table = probe_table(summary)
    assert table["policy"].tolist() == ["base", "binary/iter1", "textual/iter1"]
    assert table.loc[2, "good - bad (nats/token)"].startswith("+0.0100 [+0.0100, +0.0100]")
    assert table.loc[2, "embedding distance / row norm"] == pytest.approx(0.2)
    shown = leti("summary", str(results), "--markdown")
    assert shown.returncode == 0, shown.stderr
    assert (
        "reward-token probe" in shown.stdout and "| mbpp/test | textual/iter1 | 12 | +0.0100" in shown.stdout
    )
    assert "| mbpp/test | loglik_per_token | base <good> | base <bad> | 12 |" in shown.stdout


def generation_probe(policy: str, shifts: list[float]) -> GenerationProbe:
    """The probe as generated, in which problem i's solution is shifts[i] nats/token more likely after
    <|good|> than under the base model of `probe(...)`."""
    scored = [
        GenerationProbeProblem(task_id=f"mbpp/{index}", tokens=20, good=-1.0 + 0.01 * index + shift)
        for index, shift in enumerate(shifts)
    ]
    good = float(np.mean([problem.good for problem in scored]))
    return GenerationProbe(
        dataset="mbpp", split="test", policy=policy, policy_iteration=0 if policy == "base" else 1,
        dtype="bfloat16", adapter_merged=None if policy == "base" else True, num_problems=len(scored),
        estimates={"good": Estimate(value=good, ci_low=good - 0.1, ci_high=good + 0.1)}, problems=scored,
    )  # fmt: skip


def test_the_share_of_each_update_that_generation_keeps_is_summarised(results: Path, tmp_path: Path) -> None:
    for policy, shift in [("base", 0.0), ("textual/iter1", 0.01), ("binary/iter1", 0.002)]:
        write_json(results / policy / "probe" / "mbpp" / "test" / "probe.json", probe(policy, shift))
    # As generated, textual's shift of 0.01 is 0.0085 or 0.0095 by problem (0.9 of it on average);
    # binary's is lost entirely.
    kept = {"base": [0.0] * 12, "textual/iter1": [0.0085, 0.0095] * 6, "binary/iter1": [0.0] * 12}
    for policy, shifts in kept.items():
        write_json(
            results / policy / "probe" / "mbpp" / "test" / "generation.json", generation_probe(policy, shifts)
        )
    summary, outputs = summarize_into(results, tmp_path)

    written = pd.read_csv(outputs.csv)
    ratios = written[written["metric"] == "probe:generation_shift_ratio"].set_index("policy")
    assert sorted(ratios.index) == ["binary/iter1", "textual/iter1"]
    textual = ratios.loc["textual/iter1"]
    assert textual["value"] == pytest.approx(0.9)
    assert 0.8 < textual["ci_low"] < 0.9 < textual["ci_high"] < 1.0
    assert ratios.loc["binary/iter1", "value"] == pytest.approx(0.0, abs=1e-9)
    goods = written[written["metric"] == "probe:generation_good"]
    assert sorted(set(goods["policy"])) == ["base", "binary/iter1", "textual/iter1"]

    comparisons = pd.read_csv(outputs.comparisons)
    shifts = comparisons[comparisons["kind"] == "probe_generation_vs_base"].set_index("policy_a")
    assert (shifts["metric"] == "generation_loglik_per_token").all()
    assert shifts.loc["textual/iter1", "difference"] == pytest.approx(0.009)
    assert shifts.loc["textual/iter1", "policy_b"] == "base"

    table = probe_table(summary).set_index("policy")
    column = "shift as generated / float32 [95% CI]"
    assert table.loc["textual/iter1", column].startswith("0.900 [0.8")
    assert table.loc["base", column] == "-"
    shown = leti("summary", str(results), "--markdown")
    assert shown.returncode == 0, shown.stderr
    assert column in shown.stdout
    assert "| mbpp/test | textual/iter1 | 12 | +0.0100" in shown.stdout
    assert "| 0.900 [0.8" in shown.stdout


def test_each_update_is_tabled_with_its_end_loss_its_cost_and_its_probe(
    results: Path, tmp_path: Path
) -> None:
    steps = [
        TrainStep(step=i, epoch=0, loss=loss, learning_rate=1e-4, tokens=100, tokens_per_s=50)
        for i, loss in enumerate([4.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.1, 0.1], start=1)
    ]
    write_jsonl(results / "textual" / "iter1" / "train_log.jsonl", steps)
    write_json(
        eval_path(results, "textual/iter1", prefix="bad"), metrics("textual/iter1", 1, 0.1, prefix="bad")
    )
    for policy, shift in [("base", 0.0), ("textual/iter1", 0.01)]:
        write_json(results / policy / "probe" / "mbpp" / "test" / "probe.json", probe(policy, shift))
    _, outputs = summarize_into(results, tmp_path)
    train_logs = sorted(results.glob("**/train_log.jsonl"))

    table = update_table(pd.read_csv(outputs.comparisons), training_logs(train_logs)).set_index("policy")
    assert table.index.tolist() == ["binary/iter1", "textual/iter1"]
    # The last quarter of textual's 8 steps is 0.1 and 0.1; binary's 2 steps end at 2.0 / 2.
    assert table.loc["textual/iter1", ["steps", "loss at the end"]].tolist() == ["8", "0.100"]
    assert table.loc["binary/iter1", "loss at the end"] == "1.000"
    # Under <|good|>, not <|bad|>: 0.4 - 0.3 on the same 10 problems.
    assert table.loc["textual/iter1", "mbpp/test pass@1 - base [95% CI]"].startswith("+0.100 [")
    assert table.loc["binary/iter1", "mbpp/test pass@1 - base [95% CI]"].startswith("-0.100 [")
    assert table.loc["textual/iter1", "mbpp/test good - bad [95% CI]"].startswith("+0.0100 [")
    p, adjusted = table.loc["textual/iter1", "mbpp/test good - bad p (BH)"].split()
    assert float(p) < 0.01 and float(adjusted.strip("()")) < 0.01
    assert table.loc["binary/iter1", "mbpp/test good - bad [95% CI]"] == "-"
    shown = leti("summary", str(results), "--markdown")
    assert shown.returncode == 0, shown.stderr
    assert "**each trained policy: its update" in shown.stdout
    assert "| textual/iter1 | 8 | 0.100 | +0.100 [" in shown.stdout


def test_a_policy_not_evaluated_on_a_task_set_is_no_column_of_zeros(results: Path) -> None:
    # <|bad|> on MBPP only; HumanEval for the base model and textual <good> only.
    write_json(eval_path(results, "textual/iter1", "bad"), metrics("textual/iter1", 1, 0.1, prefix="bad"))
    base = metrics("base", 0, 0.5, "humaneval").model_copy(
        update={"error_types": {"passed": 5, "NameError": 1, "AssertionError": 4}}
    )
    write_json(eval_path(results, "base", dataset="humaneval"), base)
    write_json(
        eval_path(results, "textual/iter1", dataset="humaneval"),
        metrics("textual/iter1", 1, 0.5, "humaneval"),
    )
    table = outcome_table(summary_table(read_metrics(sorted(results.glob("**/metrics.json")))))
    by_tasks = table.set_index(["tasks", "outcome"])
    assert by_tasks.loc["humaneval/test", "textual/iter1 <bad>"].isna().all()
    assert by_tasks.loc["humaneval/test", "binary/iter1 <good>"].isna().all()
    assert by_tasks.loc[("mbpp/test", "passed"), "textual/iter1 <bad>"] == 1
    # An outcome the evaluation never had is a count of 0, not a blank.
    assert by_tasks.loc[("humaneval/test", "NameError"), "textual/iter1 <good>"] == 0

    shown = leti("summary", str(results), "--markdown").stdout
    humaneval = shown.split("**humaneval/test: samples by outcome**")[1].split("**")[0]
    assert "<bad>" not in humaneval and "binary" not in humaneval
    assert "| NameError | 1 | 0 |" in humaneval
    shares = shown.split("**humaneval/test: share of samples, 95% CIs**")[1].split("**")[0]
    assert "nan" not in shares and "<bad>" not in shares and "textual/iter1 <good>" in shares


def test_an_outcome_has_one_colour_in_every_panel(results: Path) -> None:
    # binary/iter1 gains a NameError that no other policy has: the panels' outcomes differ.
    document = metrics("binary/iter1", 1, 0.2).model_copy(
        update={"error_types": {"passed": 2, "NameError": 3, "AssertionError": 5}}
    )
    write_json(eval_path(results, "binary/iter1"), document)
    figure = error_types_figure(summary_table(read_metrics(sorted(results.glob("**/metrics.json")))))
    colours: dict[str, set] = {}
    for axis in figure.axes:
        for bars in axis.containers:
            colours.setdefault(bars.get_label(), set()).add(tuple(bars.patches[0].get_facecolor()))
    assert set(colours) == {"passed", "AssertionError", "NameError"}
    assert all(len(found) == 1 for found in colours.values()), colours
    assert len({next(iter(found)) for found in colours.values()}) == 3
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == ["passed", "AssertionError", "NameError"]


def leti(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "leti"), *args], capture_output=True, text=True)


def test_summary_command_prints_the_table(results: Path) -> None:
    shown = leti("summary", str(results))
    assert shown.returncode == 0, shown.stderr
    assert "mbpp/test pass@1" in shown.stdout
    assert "textual" in shown.stdout and "0.400 [" in shown.stdout
    assert "AssertionError" in shown.stdout
    assert "paired comparisons" in shown.stdout and "mcnemar-exact" in shown.stdout


def test_summary_prints_markdown_tables(results: Path) -> None:
    shown = leti("summary", str(results), "--markdown")
    assert shown.returncode == 0, shown.stderr
    blocks = shown.stdout.split("**pass@k with 95% CIs (steps: optimizer steps so far)**\n\n")
    assert len(blocks) == 2
    header, rule, *rows = blocks[1].split("\n\n")[0].splitlines()
    columns = header.count("|") - 1
    assert rule == "|" + "---|" * columns
    assert all(row.count("|") == columns + 1 for row in rows)
    assert "| textual | 1 | good | 2 | 0.400 [0.100, 0.700] |" in rows and len(rows) == 4
    assert "**paired comparisons: a - b on the same problems**" in shown.stdout


def test_markdown_cells_escape_the_column_bar() -> None:
    frame = pd.DataFrame({"token": ["<|good|>"], "value": [0.5]})
    assert markdown_table(frame, "t").splitlines()[2:] == [
        "| token | value |",
        "|---|---|",
        "| <\\|good\\|> | 0.500 |",
    ]


def test_compare_pairs_the_evaluations_two_runs_share(results: Path, tmp_path: Path) -> None:
    departure = tmp_path / "departure"
    write_json(eval_path(departure, "base"), metrics("base", 0, 0.3))
    write_json(eval_path(departure, "textual/iter1"), metrics("textual/iter1", 1, 1.0))
    write_json(
        eval_path(departure, "textual/iter1", "good", "humaneval"),
        metrics("textual/iter1", 1, 1.0, "humaneval"),
    )
    table_path = tmp_path / "departure.csv"

    shown = leti("compare", str(departure), str(results), "--output", str(table_path))
    assert shown.returncode == 0, shown.stderr
    table = pd.read_csv(table_path)
    assert list(table.columns) == COMPARISON_COLUMNS
    assert set(table["kind"]) == {"run_vs_run"}
    assert (table["policy_a"] == table["policy_b"]).all()
    rows = table.set_index("policy_a")
    assert rows.loc["base", "difference"] == 0.0
    assert rows.loc["textual/iter1", ["value_a", "value_b", "difference"]].tolist() == pytest.approx(
        [1.0, 0.4, 0.6]
    )
    # Problems 4-9 passed only in the departure: exact McNemar, 2 * 0.5**6.
    assert rows.loc["textual/iter1", "p_value"] == pytest.approx(2 * 0.5**6)
    assert "textual/iter1 <good>" in shown.stdout and "+0.600" in shown.stdout

    nothing_shared = tmp_path / "other"
    write_json(eval_path(nothing_shared, "gold/iter1"), metrics("gold/iter1", 1, 0.5))
    refused = leti("compare", str(nothing_shared), str(results))
    assert refused.returncode != 0 and "share no evaluation" in refused.stderr


BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def benchmark(path: Path, seconds: float, rss: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BENCHMARK_HEADER + f"{seconds}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t50\t1\n")


def test_timings_sum_the_benchmark_files_by_rule(tmp_path: Path) -> None:
    root = tmp_path / "benchmarks"
    benchmark(root / "prepare_model.tsv", 100.0, "900.5")
    benchmark(root / "finetune" / "textual" / "iter1.tsv", 200.0, "4500")
    benchmark(root / "finetune" / "binary" / "iter1.tsv", 150.0, "4400")
    # A job too short for Snakemake to measure memory writes "-".
    benchmark(root / "summarize.tsv", 2.0, "-")
    jobs = timing_table(root)
    assert set(jobs["job"]) == {
        "prepare_model",
        "finetune/textual/iter1",
        "finetune/binary/iter1",
        "summarize",
    }
    rules = rule_times(jobs).set_index("rule")
    assert list(rules.index) == ["finetune", "prepare_model", "summarize"]
    assert rules.loc["finetune", "jobs"] == 2
    assert rules.loc["finetune", "seconds"] == 350.0
    assert rules.loc["finetune", "longest_s"] == 200.0
    assert rules.loc["finetune", "max_rss_mb"] == 4500.0
    shown = leti("timings", str(root))
    assert shown.returncode == 0, shown.stderr
    assert "finetune" in shown.stdout and "4 jobs, 7.5 min" in shown.stdout
    markdown = leti("timings", str(root), "--markdown").stdout.splitlines()
    assert markdown[0] == "**jobs by rule**" and "| finetune | 2 | 350 | 200 | 4500 |" in markdown


def test_timings_name_a_file_that_is_no_benchmark(tmp_path: Path) -> None:
    (tmp_path / "notes.tsv").write_text("a\tb\n1\t2\n")
    shown = leti("timings", str(tmp_path))
    assert shown.returncode != 0
    assert "notes.tsv" in shown.stderr and "benchmark" in shown.stderr


@pytest.fixture
def artifacts(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "tasks": tmp_path / "resources" / "tasks" / "mbpp" / "test.jsonl",
        "samples": tmp_path / "samples.jsonl",
        "executions": tmp_path / "executions.jsonl",
        "feedback": tmp_path / "feedback.jsonl",
        "metrics": tmp_path / "metrics.json",
    }
    write_jsonl(
        paths["tasks"], [Problem(task_id="MBPP/11", dataset="mbpp", split="test", prompt="p", test_code="t")]
    )
    write_jsonl(
        paths["samples"],
        [
            Sample(
                task_id=f"MBPP/{11 + i}",
                completion=f"\nreturn {i}",
                policy_iteration=0,
                sample_index=0,
                seed=0,
                prompt_tokens=5,
                completion_tokens=3,
                finish_reason="stop",
            )
            for i in range(3)
        ],
    )
    write_jsonl(
        paths["executions"],
        [
            Execution(task_id="MBPP/11", sample_index=0, status=ExecutionStatus.passed, duration_s=0.1),
            Execution(
                task_id="MBPP/12",
                sample_index=0,
                status=ExecutionStatus.failed,
                exception_type="NameError",
                feedback="NameError: name 'x' is not defined",
                duration_s=0.1,
            ),
            Execution(task_id="MBPP/13", sample_index=0, status=ExecutionStatus.timeout, duration_s=10.0),
        ],
    )
    write_jsonl(
        paths["feedback"],
        [
            FeedbackExample(
                task_id="MBPP/12",
                sample_index=0,
                mode="textual",
                reward="bad",
                num_tokens=9,
                program_offset=3,
                text="<|bad|>...",
            )
        ],
    )
    write_json(paths["metrics"], metrics("base", 0, 0.3))
    return paths


def test_inspect_counts_outcomes_and_filters_examples(artifacts: dict[str, Path]) -> None:
    shown = leti("inspect", str(artifacts["executions"]), "--status", "NameError")
    assert shown.returncode == 0, shown.stderr
    assert "3 Execution record(s)" in shown.stdout
    for label in ("passed", "failed", "timeout", "NameError"):
        assert label in shown.stdout
    assert "name 'x' is not defined" in shown.stdout
    assert "MBPP/13" not in shown.stdout.split("outcome")[-1]

    by_task = leti("inspect", str(artifacts["samples"]), "--task-id", "MBPP/13")
    assert "return 2" in by_task.stdout and "return 1" not in by_task.stdout


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("tasks", "1 Problem record(s)"),
        ("samples", "3 Sample record(s)"),
        ("feedback", "1 FeedbackExample record(s)"),
        ("metrics", "pass@1"),
    ],
)
def test_inspect_reads_every_artifact_kind(artifacts: dict[str, Path], kind: str, expected: str) -> None:
    shown = leti("inspect", str(artifacts[kind]))
    assert shown.returncode == 0, shown.stderr
    assert expected in shown.stdout


def test_inspect_names_the_broken_line(artifacts: dict[str, Path]) -> None:
    path = artifacts["executions"]
    path.write_text(path.read_text() + '{"task_id": "MBPP/14", "status": "exploded"}\n')
    shown = leti("inspect", str(path))
    assert shown.returncode == 1
    assert f"{path}:4: not a valid Execution record" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_inspect_rejects_an_unknown_file(tmp_path: Path) -> None:
    other = tmp_path / "notes.jsonl"
    other.write_text("{}\n")
    shown = leti("inspect", str(other))
    assert shown.returncode == 1
    assert "not a known artifact" in shown.stderr
