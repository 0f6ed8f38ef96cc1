"""The `local` backend: the same dispatcher on this host, each inside bubblewrap with its own
user, PID, network, IPC and mount namespaces, a read-only view of the system, a private
/tmp, and the dispatcher as the namespace's PID 1.

Without bubblewrap it refuses to run, unless `allow_unsafe_local: true` says that plain
subprocesses (no isolation beyond rlimits) are acceptable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from leti.config import ExecuteConfig
from leti.sandbox.base import (
    DISPATCHER_PATH,
    Channel,
    Sandbox,
    SandboxError,
    SandboxPool,
    dispatcher_limits,
)

log = logging.getLogger(__name__)

DISPATCHER_MOUNT = "/opt/leti/dispatcher.py"
SCRATCH = "/tmp/run"
# What the interpreter needs from the host, read-only. On merged-/usr systems the others are symlinks.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ENVIRONMENT = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
}


class PipeChannel(Channel):
    """The dispatcher's stdin and stdout. File objects, not descriptor numbers: once closed
    by `stop()` in another thread they raise, where a number might already name a new pipe."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        super().__init__()
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        self.process = process
        self._in, self._out, self._err = process.stdin, process.stdout, process.stderr

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._in.write(view) or 0 :]

    def _read(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self._out], [], [], timeout)
        return self._out.read(1 << 16) if ready else None

    def _diagnostics(self) -> str:
        try:
            ready, _, _ = select.select([self._err], [], [], 0)
            text = self._err.read(4000).decode(errors="replace") if ready else ""
        except (OSError, ValueError):
            text = ""
        return f"; its stderr: {text}" if text else ""

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class LocalSandbox(Sandbox):
    def __init__(self, process: subprocess.Popen[bytes], kill_pid: int | None, grace_s: float) -> None:
        super().__init__(PipeChannel(process))
        self.process = process
        self.kill_pid = kill_pid
        self.grace_s = grace_s
        self._stopped = threading.Event()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        # At the end of its input the dispatcher ends the running program, kills what that
        # program started, and exits.
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self.kill_pid is not None:
            # Killing a PID namespace's init kills everything inside it, at once.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.kill_pid, signal.SIGKILL)
        else:
            # Unsafe mode has no namespace: only the dispatcher knows what to kill.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(self.grace_s)
        self.process.kill()
        self.process.wait()
        self.channel.close()


class LocalPool(SandboxPool):
    def __init__(self, settings: ExecuteConfig, size: int) -> None:
        super().__init__(settings, size)
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None and not settings.allow_unsafe_local:
            raise SandboxError(
                "bubblewrap (`bwrap`) is not installed, and the local backend does not run programs "
                "without isolation unless told to. Install it (`sudo apt-get install bubblewrap`), or use "
                "execute.backend: docker, or set execute.allow_unsafe_local: true to run programs as plain "
                "subprocesses of your own user."
            )
        self.python = _interpreter()
        # A copy every sandbox user can read, wherever the checkout lives.
        self._home = Path(tempfile.mkdtemp(prefix="leti-local-sandbox-"))
        self._home.chmod(0o755)
        self._dispatcher = self._home / "dispatcher.py"
        shutil.copyfile(DISPATCHER_PATH, self._dispatcher)
        self._dispatcher.chmod(0o444)
        if self.bwrap is None:
            log.warning("running programs WITHOUT isolation (execute.allow_unsafe_local is true)")
        else:
            help_text = subprocess.run([self.bwrap, "--help"], capture_output=True, text=True).stdout
            self._harden = ["--disable-userns"] if "--disable-userns" in help_text else []

    def _spawn(self, index: int) -> LocalSandbox:
        if self.bwrap is None:
            return self._spawn_unsafe(index)
        uid = self.settings.sandbox_uid + index
        info_read, info_write = os.pipe()
        command = [self.bwrap, "--info-fd", str(info_write), *self._harden, *self._sandbox_options(uid)]
        limits = dispatcher_limits(self.settings, SCRATCH, ["/tmp", "/dev/shm"])
        command += [str(self.python), "-X", "utf8", "-s", DISPATCHER_MOUNT, limits]
        # Root's processes are exempt from RLIMIT_NPROC, and as root bubblewrap would map the
        # sandbox's user to root: so root starts it as the unprivileged sandbox uid.
        as_user = {"user": uid, "group": uid, "extra_groups": []} if os.geteuid() == 0 else {}
        try:
            process = self._popen(command, pass_fds=(info_write,), **as_user)
        finally:
            os.close(info_write)
        with os.fdopen(info_read, "rb") as info:
            data = info.read()
        try:
            child = json.loads(data)["child-pid"]
        except (ValueError, KeyError):
            process.kill()
            _, detail = process.communicate()
            raise SandboxError(
                f"bubblewrap did not start: {detail.decode(errors='replace').strip() or 'no reason given'}"
            ) from None
        return LocalSandbox(process, child, grace_s=0.0)

    def _spawn_unsafe(self, index: int) -> LocalSandbox:
        home = self._home / f"sandbox{index}"
        home.mkdir(exist_ok=True)
        limits = dispatcher_limits(self.settings, str(home / "run"), [str(home)])
        command = [str(self.python), "-X", "utf8", "-s", str(self._dispatcher), limits]
        return LocalSandbox(self._popen(command, cwd=home), None, grace_s=5.0)

    def _popen(self, command: list[str], **options: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            env=ENVIRONMENT,
            start_new_session=True,
            **options,
        )

    def _sandbox_options(self, uid: int) -> list[str]:
        options = ["--unshare-all", "--unshare-user", "--as-pid-1", "--new-session"]
        options += ["--uid", str(uid), "--gid", str(uid), "--clearenv"]
        for name, value in ENVIRONMENT.items():
            options += ["--setenv", name, value]
        for path in SYSTEM_PATHS:
            if os.path.islink(path):
                options += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                options += ["--ro-bind", path, path]
        prefix = self.python.parent.parent
        if not any(prefix.is_relative_to(path) for path in SYSTEM_PATHS):
            options += ["--ro-bind", str(prefix), str(prefix)]
        options += ["--ro-bind", str(self._dispatcher), DISPATCHER_MOUNT]
        options += ["--proc", "/proc", "--dev", "/dev", "--size", str(16 << 20), "--tmpfs", "/dev/shm"]
        options += ["--size", str(self.settings.scratch_mb << 20), "--tmpfs", "/tmp"]
        # The sandbox's own root and /dev are tmpfs that its user owns: make them read-only, so
        # that only /tmp and /dev/shm, which are wiped after every program, can be written.
        options += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]
        return options

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._home, ignore_errors=True)


def _interpreter() -> Path:
    """The system's Python, which any sandbox user can run; else the one running us."""
    system = Path("/usr/bin/python3")
    if os.access(system, os.X_OK):
        return system
    return Path(os.path.realpath(sys.executable))
