"""`leti execute` and `leti sandbox build` as the rules call them: files in, files out."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leti.config import ExecuteConfig
from leti.errors import LetiError
from leti.execute import run_stage
from leti.io import read_json, read_jsonl, write_json, write_jsonl
from leti.records import Execution, ExecutionStatus, Problem, Sample, SandboxImage

REPO = Path(__file__).resolve().parents[1]
LETI = Path(sys.executable).with_name("leti")

PROBLEMS = [
    Problem(
        task_id="toy/add",
        dataset="toy",
        split="test",
        prompt='"""Add two numbers."""\ndef add(a, b):\n',
        test_code="assert add(1, 2) == 3\nassert add(-1, 1) == 0",
    ),
    Problem(
        task_id="toy/square",
        dataset="toy",
        split="test",
        prompt='"""Square a number."""\ndef square(x):\n',
        test_code="assert square(3) == 9",
    ),
]
COMPLETIONS = [
    ("toy/add", "    return a + b", ExecutionStatus.passed, None),
    ("toy/square", "    while True:\n        pass", ExecutionStatus.timeout, "Timeout"),
    ("toy/add", "    return a - b", ExecutionStatus.failed, "AssertionError"),
    ("toy/square", "    return x * x", ExecutionStatus.passed, None),
    ("toy/add", "    return a +", ExecutionStatus.failed, "SyntaxError"),
    ("toy/square", "    import os\n    os._exit(0)", ExecutionStatus.failed, "EarlyExit"),
    ("toy/add", "    print('adding')\n    return sum([a, b])", ExecutionStatus.passed, None),
]


def sample(task_id: str, completion: str, index: int) -> Sample:
    return Sample(
        task_id=task_id,
        completion=completion,
        policy_iteration=0,
        sample_index=index,
        seed=index,
        prompt_tokens=10,
        completion_tokens=5,
        finish_reason="stop",
    )


SAMPLES = [
    sample(task_id, completion, index) for index, (task_id, completion, _, _) in enumerate(COMPLETIONS)
]


@pytest.fixture
def stage_inputs(tmp_path: Path, sandbox_image: SandboxImage) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("tasks.jsonl", "samples.jsonl", "image.json")}
    write_jsonl(paths["tasks.jsonl"], PROBLEMS)
    write_jsonl(paths["samples.jsonl"], SAMPLES)
    write_json(paths["image.json"], sandbox_image)
    return paths


def leti(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LETI), *args], capture_output=True, text=True, timeout=300, env={"COLUMNS": "200"}
    )


def test_leti_execute_writes_one_record_per_sample_in_input_order(
    stage_inputs: dict[str, Path], tmp_path: Path
) -> None:
    output = tmp_path / "out" / "executions.jsonl"
    settings = ExecuteConfig(timeout_s=1.0).model_dump_json()
    completed = leti(
        "execute",
        *("--tasks", str(stage_inputs["tasks.jsonl"]), "--samples", str(stage_inputs["samples.jsonl"])),
        *("--output", str(output), "--settings", settings, "--threads", "2"),
        *("--sandbox", str(stage_inputs["image.json"])),
    )
    assert completed.returncode == 0, completed.stderr
    assert "3 failed, 3 passed, 1 timeout ->" in completed.stderr
    executions = read_jsonl(output, Execution)
    assert [(e.task_id, e.sample_index) for e in executions] == [(s.task_id, s.sample_index) for s in SAMPLES]
    assert [(e.status, e.exception_type) for e in executions] == [
        (status, kind) for _, _, status, kind in COMPLETIONS
    ]
    by_index = {execution.sample_index: execution for execution in executions}
    # Line numbers are those of the whole program: prompt (2 lines), completion, tests.
    assert by_index[2].feedback == (
        'Traceback (most recent call last):\n  File "program.py", line 4, in <module>\n'
        "    assert add(1, 2) == 3\nAssertionError"
    )
    assert by_index[4].feedback.endswith("SyntaxError: invalid syntax")
    assert by_index[5].feedback == "EarlyExit: the program exited with status 0 before its tests finished"
    assert by_index[1].feedback == "Timeout: the program did not finish within 1 second"
    assert by_index[6].stdout_tail == "adding\nadding\n"
    assert all(
        execution.feedback == "" for execution in executions if execution.status == ExecutionStatus.passed
    )
    assert 1.0 <= by_index[1].duration_s < 2.0


def test_both_backends_give_the_same_records(stage_inputs: dict[str, Path], tmp_path: Path) -> None:
    records = {}
    for backend in ("docker", "local"):
        output = tmp_path / f"{backend}.jsonl"
        settings = ExecuteConfig(backend=backend, timeout_s=1.0)
        image = stage_inputs["image.json"] if backend == "docker" else None
        counts = run_stage(
            stage_inputs["tasks.jsonl"], stage_inputs["samples.jsonl"], output, settings, 2, image
        )
        assert counts == {"passed": 3, "failed": 3, "timeout": 1}
        records[backend] = [
            execution.model_dump(exclude={"duration_s"}) for execution in read_jsonl(output, Execution)
        ]
    assert records["docker"] == records["local"]


def test_a_sample_for_an_unknown_task_is_a_clean_error(stage_inputs: dict[str, Path], tmp_path: Path) -> None:
    write_jsonl(stage_inputs["samples.jsonl"], [*SAMPLES, sample("toy/missing", "pass", 9)])
    output = tmp_path / "executions.jsonl"
    with pytest.raises(LetiError, match=r"sample 8 is for task 'toy/missing', not in the task set"):
        run_stage(
            stage_inputs["tasks.jsonl"], stage_inputs["samples.jsonl"], output, ExecuteConfig(), 1, None
        )
    assert not output.exists()


def test_no_samples_give_an_empty_file_without_starting_a_sandbox(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "tasks.jsonl", PROBLEMS)
    write_jsonl(tmp_path / "samples.jsonl", [])
    output = tmp_path / "executions.jsonl"
    # No image record: a sandbox start would fail.
    assert (
        run_stage(tmp_path / "tasks.jsonl", tmp_path / "samples.jsonl", output, ExecuteConfig(), 2, None)
        == {}
    )
    assert output.read_text() == ""


def test_bad_settings_are_a_config_error(stage_inputs: dict[str, Path], tmp_path: Path) -> None:
    completed = leti(
        "execute",
        *("--tasks", str(stage_inputs["tasks.jsonl"]), "--samples", str(stage_inputs["samples.jsonl"])),
        *("--output", str(tmp_path / "x.jsonl"), "--settings", json.dumps({"backend": "podman"})),
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith(
        "error: invalid execute settings: backend: Input should be 'docker' or 'local'"
    )


def test_sandbox_build_is_quick_when_the_image_is_up_to_date(
    sandbox_image: SandboxImage, tmp_path: Path
) -> None:
    output = tmp_path / "image.json"
    started = time.monotonic()
    completed = leti(
        "sandbox", "build", "--output", str(output), "--dockerfile", str(REPO / "envs" / "sandbox.Dockerfile")
    )
    assert completed.returncode == 0, completed.stderr
    assert time.monotonic() - started < 15
    assert f"{sandbox_image.image} is up to date" in completed.stderr
    assert read_json(output, SandboxImage) == sandbox_image
