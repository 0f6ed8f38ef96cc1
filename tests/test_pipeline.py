"""The whole LETI DAG on the tiny model, through Snakemake, with the real docker sandbox."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import planned_jobs, run_snakemake

from leti.io import read_json, read_jsonl
from leti.records import Execution, FeedbackExample, Metrics, Problem, Sample, TrainStep

pytestmark = pytest.mark.slow

FIGURES = ("pass_at_k.png", "error_types.png", "training_loss.png")


def test_the_tiny_pipeline_runs_end_to_end(tiny_workflow: Path) -> None:
    plan = run_snakemake(tiny_workflow, "--dry-run", "--cores", "2")
    assert plan.returncode == 0, plan.stderr
    # Iteration 0 and the base model's rollouts are planned once, not once per arm.
    assert plan.stdout.count("output: results/base/eval/mbpp/test/metrics.json") == 1
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
            for task_set in ("mbpp/test", "humaneval/test"):
                metrics = read_json(folder / "eval" / task_set / "metrics.json", Metrics)
                assert metrics.policy == f"{arm}/iter{iteration}"
                assert metrics.num_samples == metrics.num_problems * 2
                assert set(metrics.pass_at_k) == {"pass@1", "pass@2"}

    summary = pd.read_csv(results / "summary.csv")
    assert set(summary["experiment"]) == {"textual", "binary"}
    assert set(summary["iteration"]) == {0, 1, 2}
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
    config_path = tiny_workflow / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["evaluate"]["temperature"] = 0.5
    config_path.write_text(yaml.safe_dump(config))
    evaluation_only = planned_outputs(tiny_workflow)
    assert evaluation_only["rules"] <= {"generate", "execute", "evaluate", "summarize", "all"}
    assert all("/eval/" in path for path in evaluation_only["generate"] + evaluation_only["execute"])
    assert len(evaluation_only["evaluate"]) == 10

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
