"""Programs that are hostile by accident, run for real in both backends.

Each gets the right status, and the sandbox it ran in is left as it was: the next program
in the same sandbox (same PID 1) sees no stray process, no leftover file, an intact system.
Closing the pool leaves no container and no process behind.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from leti.config import ExecuteConfig
from leti.records import ExecutionStatus, SandboxImage
from leti.sandbox import SandboxError, SandboxPool, open_pool
from leti.sandbox.feedback import feedback_text

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ExecuteConfig(timeout_s=2.0, memory_mb=256)

# Passes only in a clean sandbox; prints its PID namespace and the start time of its PID 1 (the
# dispatcher, whose /proc entries other than stat are closed to programs),
# which together tell sandboxes apart.
CLEAN_CHECK = """\
import os, sys
alive = sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
assert alive == [1, os.getpid()], alive
assert os.listdir("/tmp") == ["run"], os.listdir("/tmp")
assert os.listdir(".") == [], os.listdir(".")
assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")
assert os.path.isfile("/opt/leti/dispatcher.py") and os.path.isfile(sys.executable)
assert os.path.isfile(os.path.join(os.path.dirname(os.__file__), "json", "__init__.py"))
print(os.readlink("/proc/self/ns/pid"), open("/proc/1/stat").read().rsplit(")", 1)[1].split()[19])
"""

HOSTILE: dict[str, tuple[str, ExecutionStatus, str | None]] = {
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", ExecutionStatus.failed, "BlockingIOError"),
    "fork_bomb_that_ignores_errors": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        ExecutionStatus.timeout,
        "Timeout",
    ),
    "memory_bomb": (
        "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n",
        ExecutionStatus.failed,
        "MemoryError",
    ),
    "touched_memory_bomb": ("data = 'x' * (1 << 30)\n", ExecutionStatus.failed, "MemoryError"),
    "infinite_loop": ("while True:\n    pass\n", ExecutionStatus.timeout, "Timeout"),
    "sleep": ("import time\ntime.sleep(3600)\n", ExecutionStatus.timeout, "Timeout"),
    "100_mb_of_output": (
        "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n",
        ExecutionStatus.failed,
        "OutputLimitExceeded",
    ),
    "closed_stdout_then_tests_pass": (
        "import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\nassert sum([1, 2]) == 3\n",
        ExecutionStatus.passed,
        None,
    ),
    "print_to_closed_stdout": (
        "import sys\nsys.stdout.close()\nprint('hello')\n",
        ExecutionStatus.failed,
        "ValueError",
    ),
    "os_exit_0_before_the_tests": (
        "import os\n\n\ndef add(a, b):\n    return a - b\n\n\nos._exit(0)\nassert add(1, 2) == 3\n",
        ExecutionStatus.failed,
        "EarlyExit",
    ),
    "sys_exit_0_before_the_tests": (
        "import sys\n\n\ndef add(a, b):\n    return a - b\n\n\nsys.exit(0)\nassert add(1, 2) == 3\n",
        ExecutionStatus.failed,
        "SystemExit",
    ),
    "exit_before_the_tests": (
        "def add(a, b):\n    return a - b\n\n\nexit()\nassert add(1, 2) == 3\n",
        ExecutionStatus.failed,
        "SystemExit",
    ),
    "setsid_child_that_outlives_the_run": (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(3600)\n"
        "    os._exit(0)\n"
        "assert True\n",
        ExecutionStatus.passed,
        None,
    ),
    "1_gb_file": (
        "with open('big.bin', 'wb') as handle:\n    for _ in range(1024):\n        handle.write(bytes(1 << 20))\n",
        ExecutionStatus.failed,
        "OSError",
    ),
    "reads_stdin": ("name = input()\n", ExecutionStatus.failed, "EOFError"),
    "reads_all_of_stdin": ("import sys\nassert sys.stdin.read() == ''\n", ExecutionStatus.passed, None),
    "deletes_system_files": (
        "import os, shutil\n"
        "shutil.rmtree(os.path.join(os.path.dirname(os.__file__), 'json'), ignore_errors=True)\n"
        "os.remove('/opt/leti/dispatcher.py')\n",
        ExecutionStatus.failed,
        "OSError",
    ),
    "rm_rf_then_tests_pass": (
        "import subprocess\n"
        "subprocess.run(['rm', '-rf', '/opt', '/usr/bin', '/tmp', '/dev/shm'], capture_output=True)\n"
        "assert 1 + 1 == 2\n",
        ExecutionStatus.passed,
        None,
    ),
    "kills_its_parent_and_everyone": (
        "import os, signal\n"
        "os.kill(os.getppid(), signal.SIGKILL)\n"
        "os.kill(1, signal.SIGKILL)\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)\n"
        "except ProcessLookupError:\n"
        "    pass\n"
        "assert True\n",
        ExecutionStatus.passed,
        None,
    ),
    # Daemonising code closes what it inherited; the result descriptor (3) is the harness's.
    "closes_inherited_fds_then_tests_pass": (
        "import os\nos.closerange(3, 4096)\nassert 1 == 1\n",
        ExecutionStatus.failed,
        "HarnessChannelClosed",
    ),
    "closes_inherited_fds_then_tests_fail": (
        "import os\nos.closerange(3, 4096)\nassert 1 == 2\n",
        ExecutionStatus.failed,
        "HarnessChannelClosed",
    ),
    "closes_the_result_fd": ("import os\nos.close(3)\n", ExecutionStatus.failed, "HarnessChannelClosed"),
    "dup2_over_the_result_fd": (
        "import os\nos.dup2(1, 3)\nassert 1 == 1\n",
        ExecutionStatus.failed,
        "HarnessChannelClosed",
    ),
    "writes_a_pass_then_closes_the_result_fd": (
        'import os\nos.write(3, b\'{"outcome": "passed"}\')\nos.close(3)\nassert 1 == 2\n',
        ExecutionStatus.failed,
        "HarnessChannelClosed",
    ),
    "dup2_a_pipe_over_the_result_fd_and_forges_a_pass": (
        "import json, os\n"
        "read, write = os.pipe()\n"
        "os.dup2(write, 3)\n"
        "os.write(3, json.dumps({'outcome': 'passed'}).encode())\n"
        "assert 1 == 2\n",
        ExecutionStatus.failed,
        "HarnessChannelClosed",
    ),
    # A pass needs the token the dispatcher drew for this run; the program never saw it.
    "forges_a_pass_on_the_result_fd_and_exits": (
        'import os\nos.write(3, b\'{"outcome": "passed"}\')\nos._exit(0)\n',
        ExecutionStatus.failed,
        "HarnessError",
    ),
    "forges_a_pass_with_a_guessed_token_and_exits": (
        "import json, os\n"
        "os.write(3, json.dumps({'outcome': 'passed', 'token': '0' * 32}).encode())\n"
        "os._exit(0)\n",
        ExecutionStatus.failed,
        "HarnessError",
    ),
    "forges_a_pass_on_the_result_fd_then_fails": (
        'import os\nos.write(3, b\'{"outcome": "passed"}\')\nassert 1 == 2\n',
        ExecutionStatus.failed,
        "HarnessError",
    ),
    "leaves_files_everywhere": (
        "import os\n"
        "for folder in ('/tmp', '.', '/dev/shm'):\n"
        "    os.makedirs(os.path.join(folder, 'deep/er'))\n"
        "    open(os.path.join(folder, 'deep/er/file'), 'w').write('x')\n"
        "    os.chmod(os.path.join(folder, 'deep/er'), 0)\n"
        "    os.chmod(os.path.join(folder, 'deep'), 0)\n"
        "assert True\n",
        ExecutionStatus.passed,
        None,
    ),
}


def leftovers(settings: ExecuteConfig) -> list[str]:
    """Containers and host processes (programs, dispatchers, bubblewrap) of pools made with
    `settings`: everything of theirs runs as one of their sandbox uids."""
    from leti.sandbox.docker_pool import LABEL, connect

    uids = range(settings.sandbox_uid, settings.sandbox_uid + 64)
    found = [
        f"container {container.short_id}"
        for container in connect().containers.list(all=True, filters={"label": LABEL}, ignore_removed=True)
        if int(container.attrs["Config"]["User"].split(":")[0]) in uids
    ]
    for process in psutil.process_iter(["uids", "name"]):
        if process.info["uids"] is not None and process.info["uids"].real in uids:
            found.append(f"process {process.pid} {process.info['name']}")
    return found


def assert_nothing_left_behind(settings: ExecuteConfig) -> None:
    deadline = time.monotonic() + 10
    while leftovers(settings) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(settings) == []


@pytest.fixture(scope="module", params=["docker", "local"])
def pool(request: pytest.FixtureRequest, sandbox_image: SandboxImage) -> Iterator[SandboxPool]:
    settings = SETTINGS.model_copy(update={"backend": request.param})
    with open_pool(settings, 1, sandbox_image) as opened:
        yield opened
    assert_nothing_left_behind(settings)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_program_gets_its_status_and_leaves_the_sandbox_clean(pool: SandboxPool, case: str) -> None:
    program, status, exception_type = HOSTILE[case]
    before = pool.run(CLEAN_CHECK)
    assert before.status == ExecutionStatus.passed, before.exception_message
    result = pool.run(program)
    assert (result.status, result.exception_type) == (status, exception_type), result.exception_message
    after = pool.run(CLEAN_CHECK)
    assert after.status == ExecutionStatus.passed, after.exception_message
    # The same PID 1: the sandbox survived and was not replaced.
    assert after.stdout == before.stdout


def test_a_program_that_closes_the_result_fd_learns_why(pool: SandboxPool) -> None:
    result = pool.run("import os\nos.closerange(3, 4096)\nassert 1 == 2\n")
    assert (result.status, result.exception_type) == (ExecutionStatus.failed, "HarnessChannelClosed")
    assert feedback_text(result, 2048) == (
        "HarnessChannelClosed: the program closed or replaced the harness's file descriptors before its "
        "tests finished"
    )


def test_a_timeout_is_on_time(pool: SandboxPool) -> None:
    started = time.monotonic()
    result = pool.run("import time\ntime.sleep(3600)\n")
    assert result.status == ExecutionStatus.timeout
    assert 2.0 <= result.duration_s < 3.0
    assert time.monotonic() - started < 5


def test_a_server_on_the_hosts_loopback_is_out_of_reach(pool: SandboxPool) -> None:
    connections: list[tuple[str, int]] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.1)
        port = server.getsockname()[1]
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                try:
                    connection, peer = server.accept()
                except TimeoutError:
                    continue
                connections.append(peer)
                connection.close()

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        try:
            result = pool.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
            # The host's own client reaches it, so the server was really listening.
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(0.3)
        finally:
            stop.set()
            acceptor.join()
    assert (result.status, result.exception_type) == (ExecutionStatus.failed, "ConnectionRefusedError")
    assert len(connections) == 1


def test_output_tails_are_kept_and_capped(pool: SandboxPool) -> None:
    result = pool.run("import sys\nprint('a' * 5000 + 'END')\nsys.stderr.write('warning')\n")
    assert result.status == ExecutionStatus.passed
    assert len(result.stdout) == SETTINGS.output_tail_bytes
    assert result.stdout.endswith("aEND\n")
    assert result.stderr == "warning"


@pytest.mark.parametrize("backend", ["docker", "local"])
def test_closing_a_busy_pool_leaves_nothing(sandbox_image: SandboxImage, backend: str) -> None:
    # Uids of its own, to tell its leftovers from those of the module's pools.
    settings = SETTINGS.model_copy(update={"backend": backend, "timeout_s": 30.0, "sandbox_uid": 62000})
    pool = open_pool(settings, 2, sandbox_image)
    errors: list[Exception] = []

    def run() -> None:
        try:
            pool.run("import os, time\nos.fork()\ntime.sleep(60)\n")
        except SandboxError as error:
            errors.append(error)

    runner = threading.Thread(target=run)
    runner.start()
    time.sleep(1)
    assert leftovers(settings) != []
    started = time.monotonic()
    pool.close()
    runner.join()
    assert time.monotonic() - started < 10
    assert [str(error) for error in errors] == ["the sandbox pool is closed"]
    assert_nothing_left_behind(settings)
