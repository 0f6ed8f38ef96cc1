"""The pool's life: recycling, retries, order, reaping, and cleanup on exit, Ctrl-C, SIGTERM
and a crash; and the errors that refuse to run with less isolation than asked for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from leti.config import ExecuteConfig
from leti.io import write_json
from leti.records import ExecutionStatus, SandboxImage
from leti.sandbox import SandboxError, open_pool, run_programs
from leti.sandbox.base import Channel, ChannelError, Program, RunResult, Sandbox, SandboxPool
from leti.sandbox.docker_pool import (
    LABEL,
    OWNER_LABEL,
    DockerPool,
    DockerUnavailableError,
    connect,
    owner_label,
    reap_leftovers,
)
from leti.sandbox.image import build_image

REPO = Path(__file__).resolve().parents[1]
# Prints the sandbox's PID namespace and the start time of its PID 1: the same sandbox.
WHICH_SANDBOX = (
    "import os\n"
    "print(os.readlink('/proc/self/ns/pid'), open('/proc/1/stat').read().rsplit(')', 1)[1].split()[19])\n"
)


def containers_of(owner: str) -> list[str]:
    return [
        container.id
        for container in connect().containers.list(
            all=True, filters={"label": [LABEL, f"{OWNER_LABEL}={owner}"]}, ignore_removed=True
        )
    ]


def wait_until(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return bool(condition())  # type: ignore[operator]


@pytest.mark.parametrize("backend", ["docker", "local"])
def test_sandboxes_are_recycled_every_n_programs(sandbox_image: SandboxImage, backend: str) -> None:
    settings = ExecuteConfig(backend=backend, recycle_every=3)
    with open_pool(settings, 1, sandbox_image) as pool:
        seen = [pool.run(WHICH_SANDBOX).stdout for _ in range(7)]
        if backend == "docker":
            assert len(containers_of(owner_label())) == 1
    assert seen[0] == seen[1] == seen[2] != seen[3] == seen[4] == seen[5] != seen[6]
    assert containers_of(owner_label()) == []


@pytest.mark.parametrize("backend", ["docker", "local"])
def test_results_come_back_in_input_order(sandbox_image: SandboxImage, backend: str) -> None:
    programs = [
        f"import time\ntime.sleep({delay})\nprint({index})\n"
        for index, delay in enumerate([0.4, 0, 0.2, 0, 0.1, 0])
    ]
    programs.append("assert False")
    with open_pool(ExecuteConfig(backend=backend), 2, sandbox_image) as pool:
        results = run_programs(pool, programs)
    assert [result.stdout for result in results] == [f"{index}\n" for index in range(6)] + [""]
    assert [result.status for result in results] == [ExecutionStatus.passed] * 6 + [ExecutionStatus.failed]


def test_a_container_killed_under_a_program_is_replaced_and_the_program_rerun(
    sandbox_image: SandboxImage,
) -> None:
    client = connect()
    with open_pool(ExecuteConfig(), 1, sandbox_image) as pool:
        (victim,) = containers_of(owner_label())
        threading.Timer(0.5, lambda: client.api.kill(victim)).start()
        result = pool.run("import time\ntime.sleep(1.5)\nprint('done')\n")
        assert (result.status, result.stdout) == (ExecutionStatus.passed, "done\n")
        assert containers_of(owner_label()) not in ([], [victim])
    assert containers_of(owner_label()) == []


def test_leftovers_of_dead_owners_are_reaped_and_live_ones_kept(sandbox_image: SandboxImage) -> None:
    client = connect()
    host = owner_label().split(":")[0]
    dead = client.api.create_container(
        sandbox_image.image_id, command=["{}"], labels={LABEL: "1", OWNER_LABEL: f"{host}:999999999:1.00"}
    )["Id"]
    alive = client.api.create_container(
        sandbox_image.image_id, command=["{}"], labels={LABEL: "1", OWNER_LABEL: owner_label()}
    )["Id"]
    try:
        with open_pool(ExecuteConfig(), 1, sandbox_image):
            remaining = {
                container.id
                for container in client.containers.list(
                    all=True, filters={"label": LABEL}, ignore_removed=True
                )
            }
        assert dead not in remaining
        assert alive in remaining
    finally:
        client.api.remove_container(alive, force=True)
        assert reap_leftovers(client) == 0


POOL_SCRIPT = """\
import signal
import sys
from leti.config import ExecuteConfig
from leti.io import read_json
from leti.records import SandboxImage
from leti.sandbox import open_pool

# A shell that starts a job in the background sets SIGINT to ignored, and children inherit
# that (CI may run the tests so); a user's Ctrl-C reaches Python's own handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
image = read_json(sys.argv[1], SandboxImage)
# The program outlasts any delay before the signal: a pool that finished on its own would exit 0.
with open_pool(ExecuteConfig(timeout_s=120), 2, image) as pool:
    print("ready", flush=True)
    pool.run("import time\\ntime.sleep(600)")
"""


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_containers_go_when_the_owner_is_interrupted_terminated_or_killed(
    sandbox_image: SandboxImage, tmp_path: Path, how: str
) -> None:
    write_json(tmp_path / "image.json", sandbox_image)
    (tmp_path / "pool.py").write_text(POOL_SCRIPT)
    owner = subprocess.Popen(
        [sys.executable, str(tmp_path / "pool.py"), str(tmp_path / "image.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None and owner.stdout.readline() == "ready\n"
    import psutil

    label = f"{owner_label().split(':')[0]}:{owner.pid}:{psutil.Process(owner.pid).create_time():.2f}"
    assert len(containers_of(label)) == 2
    started = time.monotonic()
    owner.send_signal(getattr(signal, how))
    owner.wait(timeout=30)
    # Interrupted or terminated, it removes them itself; killed, each dispatcher sees its
    # input end, stops its program and exits, and the engine removes the container.
    assert wait_until(lambda: containers_of(label) == [], 10), containers_of(label)
    assert time.monotonic() - started < 10
    # KeyboardInterrupt ends Python by SIGINT; our SIGTERM handler exits with 128 + 15.
    assert owner.returncode == {"SIGINT": -signal.SIGINT, "SIGTERM": 143, "SIGKILL": -signal.SIGKILL}[how]


def test_an_unreachable_engine_is_an_error_that_says_what_to_do(
    sandbox_image: SandboxImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(DockerUnavailableError) as raised:
        DockerPool(ExecuteConfig(), sandbox_image, 1)
    message = str(raised.value)
    assert "cannot reach the Docker engine at unix:///nonexistent/docker.sock" in message
    assert "sudo dockerd" in message and "apt-get install docker.io" in message


def test_the_cli_reports_an_unreachable_engine_in_one_clean_error(
    sandbox_image: SandboxImage, tmp_path: Path
) -> None:
    write_json(tmp_path / "image.json", sandbox_image)
    (tmp_path / "samples.jsonl").write_text(
        '{"task_id": "t", "completion": "", "policy_iteration": 0, "sample_index": 0, "seed": 0, '
        '"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "stop"}\n'
    )
    (tmp_path / "tasks.jsonl").write_text(
        '{"task_id": "t", "dataset": "d", "split": "s", "prompt": "", "test_code": "assert True"}\n'
    )
    leti = Path(sys.executable).with_name("leti")
    files = {
        name: str(tmp_path / name) for name in ("tasks.jsonl", "samples.jsonl", "out.jsonl", "image.json")
    }
    completed = subprocess.run(
        [
            str(leti),
            "execute",
            "--tasks",
            files["tasks.jsonl"],
            "--samples",
            files["samples.jsonl"],
            "--output",
            files["out.jsonl"],
            "--sandbox",
            files["image.json"],
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock", "COLUMNS": "1000"},
        timeout=60,
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith("error: cannot reach the Docker engine")
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_an_image_with_another_dispatcher_is_refused(sandbox_image: SandboxImage) -> None:
    stale = sandbox_image.model_copy(update={"dispatcher_sha256": "0" * 64})
    with pytest.raises(SandboxError, match=r"another version of dispatcher\.py; rebuild it"):
        DockerPool(ExecuteConfig(), stale, 1)


def test_a_new_build_leaves_the_images_other_checkouts_run(
    sandbox_image: SandboxImage, tmp_path: Path
) -> None:
    """Checkouts at different commits share one engine: a build must not delete another's image."""
    client = connect()
    marker = f"t{os.getpid()}x{time.time_ns()}"
    repository = ExecuteConfig().image
    client.images.get(sandbox_image.image).tag(repository, tag=f"other-{marker}")
    dockerfile = tmp_path / "sandbox.Dockerfile"
    original = (REPO / "envs" / "sandbox.Dockerfile").read_text()
    dockerfile.write_text(f"{original}\nLABEL leti.test={marker}\n")
    lines: list[str] = []
    record = None
    try:
        record = build_image(ExecuteConfig(), dockerfile, log=lines.append)
        assert record.image != sandbox_image.image
        assert client.images.get(f"{repository}:other-{marker}").id == sandbox_image.image_id
        assert client.images.get(sandbox_image.image).id == sandbox_image.image_id
        assert any(f"{repository}:other-{marker}" in line and "docker rmi" in line for line in lines)
    finally:
        client.images.remove(f"{repository}:other-{marker}")
        if record is not None:
            client.images.remove(record.image)


def test_the_docker_backend_needs_the_image_record() -> None:
    with pytest.raises(SandboxError, match="--sandbox"):
        open_pool(ExecuteConfig(), 1, None)


def test_local_never_runs_unisolated_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("leti.sandbox.local.shutil.which", lambda name: None)
    with pytest.raises(SandboxError, match="allow_unsafe_local: true"):
        open_pool(ExecuteConfig(backend="local"), 1)
    with open_pool(ExecuteConfig(backend="local", allow_unsafe_local=True), 1) as pool:
        passed = pool.run("assert 1 + 1 == 2")
        early_exit = pool.run("import os\nos._exit(0)\nassert False")
        escaped = pool.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(3600)\n")
        assert (passed.status, early_exit.exception_type) == (ExecutionStatus.passed, "EarlyExit")
        assert escaped.status == ExecutionStatus.passed
        # The dispatcher is a child subreaper: the escaped grandchild was killed with the run.
        assert [child.name() for child in _dispatcher_children()] == []


def _dispatcher_children() -> list:
    import psutil

    dispatchers = [
        child for child in psutil.Process().children() if "dispatcher.py" in " ".join(child.cmdline())
    ]
    return [grandchild for dispatcher in dispatchers for grandchild in dispatcher.children(recursive=True)]


# --- the pool's bookkeeping, with a sandbox that breaks on demand


class NullChannel(Channel):
    def _write(self, data: bytes) -> None:
        pass

    def _read(self, timeout: float) -> bytes | None:
        return b""

    def close(self) -> None:
        pass


class FlakySandbox(Sandbox):
    def __init__(self, breaks: bool) -> None:
        super().__init__(NullChannel())
        self.breaks = breaks
        self.stopped = False

    def wait_until_ready(self) -> None:
        pass

    def run(self, program: Program, timeout: float) -> RunResult:
        self.used += 1
        if self.breaks:
            raise ChannelError("the dispatcher exited")
        return RunResult(status=ExecutionStatus.passed, stdout=program.source)

    def stop(self) -> None:
        self.stopped = True


class FlakyPool(SandboxPool):
    def __init__(self, breaking: list[bool]) -> None:
        super().__init__(ExecuteConfig(recycle_every=2), 1)
        self.breaking = breaking
        self.spawned: list[FlakySandbox] = []

    def _spawn(self, index: int) -> FlakySandbox:
        sandbox = FlakySandbox(self.breaking.pop(0))
        self.spawned.append(sandbox)
        return sandbox


def test_a_broken_sandbox_is_replaced_and_the_program_retried_once() -> None:
    # recycle_every is 2: "third" finds its sandbox used up, and both fresh ones break.
    with FlakyPool([True, False, True, True]) as pool:
        assert pool.run("first").stdout == "first"
        assert pool.run("second").status == ExecutionStatus.passed
        third = pool.run("third")
    assert third.status == ExecutionStatus.sandbox_error
    assert third.exception_message == "the sandbox broke twice running this program: the dispatcher exited"
    assert [sandbox.stopped for sandbox in pool.spawned] == [True] * 4


def test_a_closed_pool_refuses_work() -> None:
    pool = FlakyPool([False])
    pool.open()
    pool.close()
    with pytest.raises(SandboxError, match="the sandbox pool is closed"):
        pool.run("x")
