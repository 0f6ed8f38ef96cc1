"""The whole LETI DAG on the tiny model, through Snakemake, with the real docker sandbox."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import planned_jobs, run_snakemake

from leti.io import read_json, read_jsonl
from leti.records import (
    Execution,
    FeedbackExample,
    GenerationProbe,
    Metrics,
    Probe,
    Problem,
    Sample,
    TrainStep,
)

pytestmark = pytest.mark.slow

FIGURES = (
    "pass_at_k.png",
    "sample_efficiency.png",
    "error_types.png",
    "training_loss.png",
    "reward_probe.png",
)
TRAINED = [f"{arm}/iter{i}" for arm in ("binary", "textual") for i in (1, 2)]
EVAL_SETS = ("humaneval/test", "mbpp/test")


def test_the_tiny_pipeline_runs_end_to_end(tiny_workflow: Path) -> None:
    config_path = tiny_workflow / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["evaluate"]["reward_prefix"] = ["good", "bad"]
    config_path.write_text(yaml.safe_dump(config))
    plan = run_snakemake(tiny_workflow, "--dry-run", "--cores", "2")
    assert plan.returncode == 0, plan.stderr
    # Iteration 0 and the base model's rollouts are planned once, not once per arm.
    assert plan.stdout.count("output: results/base/eval-none/mbpp/test/metrics.json") == 1
    assert plan.stdout.count("output: results/base/rollouts/mbpp/train/samples.jsonl") == 1

    run = run_snakemake(tiny_workflow, "--cores", "2")
    assert run.returncode == 0, run.stderr[-5000:]
    results = tiny_workflow / "results"

    # Every artifact reads back through its record type.
    assert len(read_jsonl(tiny_workflow / "resources/tasks/mbpp/train.jsonl", Problem)) == 3
    rollouts = results / "base/rollouts/mbpp/train"
    samples = read_jsonl(rollouts / "samples.jsonl", Sample)
    executions = read_jsonl(rollouts / "executions.jsonl", Execution)
    assert len(samples) == len(executions) == 3 * 2
    assert [(s.task_id, s.sample_index) for s in samples] == [(e.task_id, e.sample_index) for e in executions]
    for arm in ("textual", "binary"):
        for iteration in (1, 2):
            folder = results / arm / f"iter{iteration}"
            feedback = read_jsonl(folder / "feedback.jsonl", FeedbackExample)
            assert feedback and {example.mode for example in feedback} == {arm}
            assert read_jsonl(folder / "train_log.jsonl", TrainStep)
            assert (folder / "adapter" / "adapter_config.json").is_file()
            for task_set in EVAL_SETS:
                for prefix in ("good", "bad"):
                    metrics = read_json(folder / f"eval-{prefix}" / task_set / "metrics.json", Metrics)
                    assert (metrics.policy, metrics.reward_prefix) == (f"{arm}/iter{iteration}", prefix)
                    assert metrics.num_samples == metrics.num_problems * 2
                    assert set(metrics.pass_at_k) == {"pass@1", "pass@2"}
                    assert len(metrics.problems) == metrics.num_problems

    # Every policy's reward-token probe on the probed task set: all its problems have a reference.
    for policy in ["base", *TRAINED]:
        probe = read_json(results / policy / "probe" / "mbpp" / "test" / "probe.json", Probe)
        assert (probe.policy, probe.num_problems, len(probe.problems)) == (policy, 3, 3)
        assert set(probe.estimates) == {"good", "bad", "good_minus_bad"}
        assert (probe.embedding_distance == 0) == (policy == "base")
        generated = read_json(
            results / policy / "probe" / "mbpp" / "test" / "generation.json", GenerationProbe
        )
        assert (generated.dtype, generated.adapter_merged) == ("float32", None if policy == "base" else True)
        assert [p.task_id for p in generated.problems] == [p.task_id for p in probe.problems]
    assert not (results / "base" / "probe" / "humaneval").exists()

    summary = pd.read_csv(results / "summary.csv")
    assert set(summary["experiment"]) == {"textual", "binary"}
    assert set(summary["iteration"]) == {0, 1, 2}
    rollout_rates = summary[(summary["purpose"] == "rollouts") & (summary["metric"] == "pass@1")]
    assert set(rollout_rates["policy"]) == {"base", "textual/iter1", "binary/iter1"}
    steps = summary[summary["purpose"] == "eval"].groupby("policy")["optimizer_steps"].first()
    assert steps["base"] == 0 and steps["textual/iter2"] > steps["textual/iter1"] > 0
    # Generation runs in float32 here: it keeps the whole of every update.
    kept = summary[summary["metric"] == "probe:generation_shift_ratio"].set_index("policy")["value"]
    assert sorted(kept.index.unique()) == sorted(TRAINED)
    assert kept.to_numpy() == pytest.approx(1.0, abs=1e-3)
    assert summary.loc[summary["metric"] == "pass@1", ["ci_low", "ci_high"]].notna().all().all()

    # One comparison per metric of: every trained policy and prefix vs the base model, the two arms
    # at each iteration and prefix, and good vs bad for every trained policy; on every task set.
    comparisons = pd.read_csv(results / "comparisons.csv")
    assert set(comparisons["metric"]) == {
        "pass@1",
        "pass@2",
        "loglik_per_token",
        "generation_loglik_per_token",
    }
    probed = comparisons[comparisons["metric"] == "loglik_per_token"]
    assert sorted(probed[["kind", "policy_a"]].itertuples(index=False, name=None)) == sorted(
        [("probe_good_vs_bad", p) for p in ["base", *TRAINED]] + [("probe_vs_base", p) for p in TRAINED]
    )
    pairs = comparisons[comparisons["metric"] == "pass@1"]
    expected = (
        [("vs_base", p, x, "base", "none", t) for p in TRAINED for x in ("good", "bad") for t in EVAL_SETS]
        + [
            ("arm_vs_arm", f"binary/iter{i}", x, f"textual/iter{i}", x, t)
            for i in (1, 2)
            for x in ("good", "bad")
            for t in EVAL_SETS
        ]
        + [("good_vs_bad", p, "good", p, "bad", t) for p in TRAINED for t in EVAL_SETS]
    )
    columns = ["kind", "policy_a", "reward_prefix_a", "policy_b", "reward_prefix_b", "dataset"]
    found = [(k, a, xa, b, xb, f"{d}/test") for k, a, xa, b, xb, d in pairs[columns].itertuples(index=False)]
    assert sorted(found) == sorted(expected)
    assert (pairs["ci_low"] <= pairs["difference"]).all() and (pairs["difference"] <= pairs["ci_high"]).all()
    assert pairs["p_value"].between(0, 1).all()
    for figure in FIGURES:
        assert (results / "plots" / figure).read_bytes().startswith(b"\x89PNG")

    report = run_snakemake(tiny_workflow, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tiny_workflow / "report.html").read_text()
    for figure in FIGURES:
        assert figure in html
    # The figures are embedded, not linked: one base64 PNG each at least.
    assert len(re.findall(r"iVBORw0KGgo", html)) >= len(FIGURES)

    again = run_snakemake(tiny_workflow, "--dry-run", "--cores", "2")
    assert "Nothing to be done" in again.stdout + again.stderr

    # Reruns are cheap: a changed setting reruns the jobs it reaches and nothing else.
    config["evaluate"]["reward_prefix"] = ["good", "bad", "none"]
    config_path.write_text(yaml.safe_dump(config))
    new_prefix = planned_outputs(tiny_workflow)
    assert new_prefix["rules"] == {"generate", "execute", "evaluate", "summarize", "all"}
    assert all("/eval-none/" in path for path in new_prefix["generate"] + new_prefix["execute"])
    assert len(new_prefix["generate"]) == len(TRAINED) * len(EVAL_SETS)

    config["evaluate"]["reward_prefix"] = ["good", "bad"]
    config["evaluate"]["temperature"] = 0.5
    config_path.write_text(yaml.safe_dump(config))
    evaluation_only = planned_outputs(tiny_workflow)
    assert evaluation_only["rules"] <= {"generate", "execute", "evaluate", "summarize", "all"}
    assert all("/eval-" in path for path in evaluation_only["generate"] + evaluation_only["execute"])
    assert len(evaluation_only["evaluate"]) == 2 + len(TRAINED) * 2 * 2

    config["evaluate"]["temperature"] = 0.8
    config["finetune"]["learning_rate"] = 2e-2
    config_path.write_text(yaml.safe_dump(config))
    training = planned_outputs(tiny_workflow)
    assert len(training["finetune"]) == 4
    assert training["build_feedback"] == [
        "results/binary/iter2/feedback.jsonl",
        "results/textual/iter2/feedback.jsonl",
    ]
    assert not any(path.startswith("results/base/") for paths in training.values() for path in paths)
    assert not {"prepare_model", "prepare_tasks", "build_sandbox"} & training["rules"]


def planned_outputs(workdir: Path) -> dict:
    """{rule: sorted first outputs} of the jobs a dry-run plans, plus the set of rules under "rules"."""
    outputs: dict = {}
    for job in planned_jobs(workdir):
        outputs.setdefault(job.rule, []).append(job.outputs[0] if job.outputs else "")
    return {**{rule: sorted(paths) for rule, paths in outputs.items()}, "rules": set(outputs)}
