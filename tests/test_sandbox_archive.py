"""execute.image_archive: an execute job on a node whose engine lacks the sandbox image loads
it from the archive build_sandbox saved.

The Docker engine is shared with other runs, so the sandbox image itself is never removed:
each test works on a throwaway image made from it (one more label, so a new id on the same
layers), which it removes and expects back.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from conftest import planned_jobs
from docker.errors import ImageNotFound

from leti.config import ExecuteConfig
from leti.execute import run_stage
from leti.io import read_jsonl, write_json, write_jsonl
from leti.records import Execution, Problem, Sample, SandboxImage
from leti.sandbox import SandboxError
from leti.sandbox.docker_pool import DockerPool
from leti.sandbox.image import save_image

LETI = Path(sys.executable).with_name("leti")
ARCHIVE = "resources/sandbox/image.tar.gz"

PROBLEM = Problem(
    task_id="toy/add",
    dataset="toy",
    split="test",
    prompt='"""Add two numbers."""\ndef add(a, b):\n',
    test_code="assert add(1, 2) == 3",
)
COMPLETIONS = ["    return a + b", "    return a - b", "    return a +", "    return undefined_name"]
SAMPLES = [
    Sample(
        task_id=PROBLEM.task_id,
        completion=completion,
        policy_iteration=0,
        sample_index=index,
        seed=index,
        prompt_tokens=10,
        completion_tokens=5,
        finish_reason="stop",
    )
    for index, completion in enumerate(COMPLETIONS)
]


@pytest.fixture(scope="module")
def throwaway(
    sandbox_image: SandboxImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SandboxImage, Path]]:
    """A copy of the sandbox image under its own tag and id, its record, and its archive."""
    client = docker.from_env()
    marker = uuid.uuid4().hex[:12]
    dockerfile = f"FROM {sandbox_image.image}\nLABEL leti.test={marker}\n".encode()
    image, _ = client.images.build(fileobj=io.BytesIO(dockerfile), tag=f"leti-sandbox-test:{marker}", rm=True)
    record = sandbox_image.model_copy(update={"image": f"leti-sandbox-test:{marker}", "image_id": image.id})
    archive = tmp_path_factory.mktemp("sandbox") / "image.tar.gz"
    save_image(record, archive, log=lambda line: None)
    yield record, archive
    remove(record)


def remove(record: SandboxImage) -> None:
    with contextlib.suppress(ImageNotFound):
        docker.from_env().images.remove(record.image_id)


def present(record: SandboxImage) -> bool:
    try:
        return docker.from_env().images.get(record.image).id == record.image_id
    except ImageNotFound:
        return False


@pytest.fixture
def stage_inputs(tmp_path: Path, throwaway: tuple[SandboxImage, Path]) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("tasks.jsonl", "samples.jsonl", "image.json")}
    write_jsonl(paths["tasks.jsonl"], [PROBLEM])
    write_jsonl(paths["samples.jsonl"], SAMPLES)
    write_json(paths["image.json"], throwaway[0])
    return paths


def verdicts(path: Path) -> list[dict]:
    return [execution.model_dump(exclude={"duration_s"}) for execution in read_jsonl(path, Execution)]


def test_an_execute_job_without_the_image_loads_it_and_gives_the_same_verdicts(
    throwaway: tuple[SandboxImage, Path], stage_inputs: dict[str, Path], tmp_path: Path
) -> None:
    record, archive = throwaway
    settings = ExecuteConfig(timeout_s=2.0)
    inputs = (stage_inputs["tasks.jsonl"], stage_inputs["samples.jsonl"])
    assert present(record)
    run_stage(*inputs, tmp_path / "with.jsonl", settings, 2, stage_inputs["image.json"])

    remove(record)
    assert not present(record)
    counts = run_stage(
        *inputs, tmp_path / "loaded.jsonl", settings, 2, stage_inputs["image.json"], sandbox_archive=archive
    )
    assert present(record)
    assert counts == {"passed": 1, "failed": 3}
    assert verdicts(tmp_path / "loaded.jsonl") == verdicts(tmp_path / "with.jsonl")
    assert [execution["exception_type"] for execution in verdicts(tmp_path / "loaded.jsonl")] == [
        None,
        "AssertionError",
        "SyntaxError",
        "NameError",
    ]


def test_execute_jobs_starting_together_load_the_archive_once(
    throwaway: tuple[SandboxImage, Path], stage_inputs: dict[str, Path], tmp_path: Path
) -> None:
    record, archive = throwaway
    remove(record)
    jobs = [
        subprocess.Popen(
            [
                *(str(LETI), "execute", "--tasks", str(stage_inputs["tasks.jsonl"])),
                *(
                    "--samples",
                    str(stage_inputs["samples.jsonl"]),
                    "--output",
                    str(tmp_path / f"{job}.jsonl"),
                ),
                *("--sandbox", str(stage_inputs["image.json"]), "--sandbox-archive", str(archive)),
                *("--settings", ExecuteConfig(timeout_s=2.0).model_dump_json()),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in range(3)
    ]
    logs = [job.communicate(timeout=300)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], logs
    assert sum(f"loaded {record.image} from {archive}" in log for log in logs) == 1, logs
    assert present(record)
    assert verdicts(tmp_path / "1.jsonl") == verdicts(tmp_path / "0.jsonl") == verdicts(tmp_path / "2.jsonl")


def test_an_archive_of_another_image_is_a_clear_error(
    throwaway: tuple[SandboxImage, Path], stage_inputs: dict[str, Path], tmp_path: Path
) -> None:
    record, archive = throwaway
    recorded = record.model_copy(update={"image_id": "sha256:" + "0" * 64})
    write_json(stage_inputs["image.json"], recorded)
    output = tmp_path / "executions.jsonl"
    with pytest.raises(SandboxError) as raised:
        run_stage(
            *(stage_inputs["tasks.jsonl"], stage_inputs["samples.jsonl"], output, ExecuteConfig(), 1),
            stage_inputs["image.json"],
            sandbox_archive=archive,
        )
    assert str(raised.value) == (
        f"{archive} holds the image {record.image_id}, not {recorded.image_id} that the image record "
        f"names ({record.image}): the archive is from another build; rerun build_sandbox"
    )
    assert not output.exists()


def test_without_the_archive_a_missing_image_is_an_error_that_names_the_key(
    throwaway: tuple[SandboxImage, Path],
) -> None:
    record, _ = throwaway
    remove(record)
    with pytest.raises(SandboxError) as raised:
        DockerPool(ExecuteConfig(), record, 1)
    message = str(raised.value)
    assert message.startswith(f"the sandbox image {record.image} is not in the Docker engine of ")
    assert message.endswith("set execute.image_archive: true")


def test_with_image_archive_build_sandbox_saves_the_image_and_execute_jobs_take_it(workdir: Path) -> None:
    (workdir / "archive.yaml").write_text("execute:\n  image_archive: true\n")
    jobs = planned_jobs(workdir, "--configfile", str(workdir / "archive.yaml"))
    (build,) = (job for job in jobs if job.rule == "build_sandbox")
    assert build.outputs == ["resources/sandbox/image.json", ARCHIVE]
    executions = [job for job in jobs if job.rule == "execute"]
    assert executions and all(ARCHIVE in job.inputs for job in executions)


def test_by_default_nothing_saves_or_reads_an_archive(workdir: Path) -> None:
    jobs = planned_jobs(workdir)
    (build,) = (job for job in jobs if job.rule == "build_sandbox")
    assert build.outputs == ["resources/sandbox/image.json"]
    executions = [job for job in jobs if job.rule == "execute"]
    assert executions and not any(ARCHIVE in job.inputs for job in executions)
