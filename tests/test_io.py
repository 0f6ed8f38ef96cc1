from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from leti.io import (
    ArtifactError,
    atomic_directory,
    read_json,
    read_jsonl,
    temporary_prefix,
    write_json,
    write_jsonl,
)
from leti.records import Execution, ExecutionStatus, Metrics, Sample


def make_sample(index: int) -> Sample:
    return Sample(
        task_id=f"MBPP/{601 + index}",
        completion=f"def f():\n    return {index}\n",
        policy_iteration=1,
        sample_index=index,
        seed=7,
        prompt_tokens=10,
        completion_tokens=5,
        finish_reason="stop",
    )


def test_records_round_trip_through_jsonl(tmp_path: Path) -> None:
    samples = [make_sample(index) for index in range(3)]
    path = tmp_path / "samples.jsonl"
    assert write_jsonl(path, samples) == 3
    assert read_jsonl(path, Sample) == samples
    assert len(path.read_text().splitlines()) == 3


def test_enum_fields_are_written_as_plain_strings(tmp_path: Path) -> None:
    record = Execution(task_id="MBPP/1", sample_index=0, status=ExecutionStatus.timeout, duration_s=1.5)
    path = tmp_path / "executions.jsonl"
    write_jsonl(path, [record])
    assert '"status":"timeout"' in path.read_text()
    assert read_jsonl(path, Execution)[0].status is ExecutionStatus.timeout


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, [make_sample(0)])
    path.write_text("\n" + path.read_text() + "\n\n")
    assert len(read_jsonl(path, Sample)) == 1


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"task_id": "MBPP/1", "completion": ', "not a valid Sample record: Invalid JSON"),
        ('{"task_id": "MBPP/1"}', "completion: Field required"),
        ("[1, 2]", "Input should be an object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, [make_sample(0), make_sample(1)])
    path.write_text(path.read_text() + bad_line + "\n")
    with pytest.raises(ArtifactError) as caught:
        read_jsonl(path, Sample)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert expected in str(caught.value)


def test_unknown_field_is_rejected_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    line = make_sample(0).model_dump_json()[:-1] + ', "extra": 1}'
    path.write_text(line + "\n")
    with pytest.raises(ArtifactError, match=r":1: .*extra: Extra inputs are not permitted"):
        read_jsonl(path, Sample)


def test_wrong_record_type_fails_on_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, [make_sample(0)])
    with pytest.raises(ArtifactError, match=r"samples.jsonl:1: not a valid Execution record"):
        read_jsonl(path, Execution)


def test_missing_file_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl", Sample)


def test_json_document_round_trip_and_error(tmp_path: Path) -> None:
    metrics = Metrics(
        dataset="mbpp",
        split="test",
        policy="base",
        policy_iteration=0,
        num_problems=2,
        num_samples=2,
        pass_at_k={"pass@1": 0.5},
        error_types={"passed": 1, "AssertionError": 1},
        mean_completion_tokens=12.0,
    )
    path = tmp_path / "metrics.json"
    write_json(path, metrics)
    assert read_json(path, Metrics) == metrics
    path.write_text(path.read_text().replace('"num_samples": 2', '"num_samples": -1'))
    with pytest.raises(ArtifactError, match=r"metrics.json: not a valid Metrics document: num_samples"):
        read_json(path, Metrics)


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path: Path) -> None:
    def records_then_crash():
        yield make_sample(0)
        raise RuntimeError("generator died")

    path = tmp_path / "samples.jsonl"
    with pytest.raises(RuntimeError):
        write_jsonl(path, records_then_crash())
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, [make_sample(0)])
    before = path.read_bytes()

    def crash():
        yield make_sample(1)
        raise RuntimeError

    with pytest.raises(RuntimeError):
        write_jsonl(path, crash())
    assert path.read_bytes() == before


def test_writer_killed_mid_write_leaves_no_output(tmp_path: Path) -> None:
    """SIGKILL gives no chance to clean up: the output path must simply never have existed."""
    path = tmp_path / "out" / "samples.jsonl"
    started = tmp_path / "started"
    writer = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from leti.io import write_jsonl
        from leti.records import Sample

        def slow_records():
            for index in range(10_000):
                if index == 100:
                    Path({str(started)!r}).touch()
                    time.sleep(60)
                yield Sample(task_id="t", completion="x" * 1000, policy_iteration=0,
                             sample_index=index, seed=0, prompt_tokens=1, completion_tokens=1,
                             finish_reason="stop")

        write_jsonl({str(path)!r}, slow_records())
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert process.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        process.kill()
    assert not path.exists()
    leftovers = list(path.parent.iterdir())
    assert leftovers and all(leftover.name.startswith(".samples.jsonl.") for leftover in leftovers)
    # The rerun's write clears the dead writer's temporary.
    write_jsonl(path, [])
    assert list(path.parent.iterdir()) == [path]


def test_only_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "model"
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)
    dead = tmp_path / f"{temporary_prefix(target, dead_pid)}abc.tmp"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f"{temporary_prefix(target, os.getppid())}def.tmp"
    alive.write_text("still writing")
    other_output = tmp_path / f".{target.name}-2.host-{dead_pid}.ghi.tmp"
    other_output.write_text("not ours")
    with atomic_directory(target) as folder:
        (folder / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other_output.name, "model"])


def test_atomic_directory_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    with atomic_directory(target) as staging:
        (staging / "weights.bin").write_bytes(b"v1")
    assert (target / "weights.bin").read_bytes() == b"v1"

    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "weights.bin").write_bytes(b"half")
        raise RuntimeError("killed")
    assert (target / "weights.bin").read_bytes() == b"v1"
    assert [entry.name for entry in tmp_path.iterdir()] == ["adapter"]


def test_artifacts_get_the_usual_permissions(tmp_path: Path) -> None:
    """Temporary files are private; the renamed artifact must be as readable as any other file."""
    import os

    umask = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "samples.jsonl", [make_sample(0)])
        with atomic_directory(tmp_path / "adapter") as staging:
            (staging / "w.bin").write_bytes(b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "samples.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
