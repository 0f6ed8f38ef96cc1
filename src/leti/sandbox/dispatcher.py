"""The program runner that lives inside each sandbox (a container, or bubblewrap for `local`).

It reads one JSON request per line on stdin and answers one JSON result per line on
stdout. Each program runs in a child forked from this already-started interpreter, which
saves the ~20 ms start of a new Python per program. The child gets its own session,
rlimits, /dev/null as stdin and pipes as stdout/stderr; the verdict "passed" comes only
from a message the child's harness writes on a separate pipe after the program, tests
included, ran to its end, so an early `os._exit(0)` can never pass.

Whatever happens once the program's own code has started is the program's doing: a program
that closes or replaces that pipe's descriptor (daemonising code does) fails with
`HarnessChannelClosed`; only a failure before it started is a `sandbox_error`.

This file must stay standard-library only and importable by an old-ish Python 3: it is
copied into the sandbox image and runs under the image's interpreter, not the project's.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import gc
import io
import json
import linecache
import os
import platform
import resource
import selectors
import signal
import stat
import sys
import time
import traceback
import types

PROTOCOL = 1
PROGRAM_NAME = "program.py"

# Modules most generated programs import: loading them once here, before any fork, makes
# `import re` in a program a dictionary lookup instead of a file system walk.
PRELOAD = (
    "array",
    "bisect",
    "cmath",
    "collections",
    "copy",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "textwrap",
    "typing",
    "unicodedata",
)

MAX_RESULT_BYTES = 16 << 20
MAX_MESSAGE_CHARS = 20_000
MAX_LINE_CHARS = 1_000
CHILD_SETUP_FAILED = 120
# The harness's exit status when the program closed or replaced the result descriptor.
CHANNEL_CLOSED = 121
RESULT_FD = 3

# Bound before any program runs: a program may rebind the module attributes in its copy.
_exit = os._exit
_fstat = os.fstat
# Held so that replacing sys.stdout in a child never garbage-collects (and so closes) fd 1.
_ORIGINAL_STREAMS = (sys.stdin, sys.stdout, sys.stderr)
_dumps = json.dumps
_extract_tb = traceback.extract_tb
_TracebackException = traceback.TracebackException
_display = sys.__excepthook__


class HostGone(Exception):
    """Our input ended while a program ran: nobody is left to answer."""


class Limits:
    """The dispatcher's settings, given once as a JSON argument when the sandbox starts."""

    def __init__(
        self,
        timeout_s: float,
        memory_bytes: int,
        file_bytes: int,
        processes: int,
        open_files: int,
        output_bytes: int,
        tail_bytes: int,
        scratch: str,
        wipe: list[str],
    ) -> None:
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.file_bytes = file_bytes
        self.processes = processes
        self.open_files = open_files
        self.output_bytes = output_bytes
        self.tail_bytes = tail_bytes
        self.scratch = scratch
        self.wipe = wipe


# --- the child: one program


def _child(source: str, limits: Limits, out_w: int, err_w: int, result_w: int, token: str) -> None:
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for number in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.dup2(result_w, RESULT_FD)
    os.closerange(RESULT_FD + 1, limits.open_files)
    channel = _identity(RESULT_FD)
    cpu = _cpu_limit(limits)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        # Raising one's own OOM score needs no privilege; it makes the kernel pick the
        # program, not the dispatcher, when a container's memory cap is hit.
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        pass
    os.chdir(limits.scratch)
    os.environ["TMPDIR"] = limits.scratch
    os.environ["HOME"] = limits.scratch
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", errors="backslashreplace"
    )
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    if "random" in sys.modules:
        # Forked children share the parent's generator state; a fresh interpreter would not.
        sys.modules["random"].seed()
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=PROGRAM_NAME, __builtins__=builtins)
    sys.modules["__main__"] = main
    sys.argv = [PROGRAM_NAME]
    sys.path[0] = limits.scratch
    linecache.cache[PROGRAM_NAME] = (len(source), None, source.splitlines(True), PROGRAM_NAME)
    harness_pid = os.getpid()
    # A script's module code runs at the bottom of the stack, ours below the harness's frames
    # and exec(): raising the recursion limit by their number gives the program the headroom
    # it has as a script, so it fails, and its traceback reads, exactly as when run alone.
    depth, frame = 1, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    sys.setrecursionlimit(sys.getrecursionlimit() + depth)
    try:
        code = compile(source, PROGRAM_NAME, "exec", dont_inherit=True)
        exec(code, main.__dict__)
        result = {"outcome": "passed"}
    except BaseException as error:
        result = _describe(error)
    result["token"] = token
    if os.getpid() != harness_pid:
        # A process the program forked returned through the harness: only the original
        # child speaks for the run.
        _exit(0)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    if _identity(RESULT_FD) != channel:
        # Written now, the result would go wherever the program pointed the descriptor.
        _exit(CHANNEL_CLOSED)
    try:
        _write_all(RESULT_FD, _dumps(result).encode())
    except OSError:
        _exit(CHANNEL_CLOSED)
    _exit(0)


def _identity(fd: int) -> tuple[int, int] | None:
    """What `fd` refers to (device and inode), or None when it is closed."""
    try:
        status = _fstat(fd)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _describe(error: BaseException) -> dict:
    name = type(error).__name__
    try:
        message = str(error)[:MAX_MESSAGE_CHARS]
    except BaseException:
        message = ""
    try:
        frames = _program_frames(error.__traceback__)
        lines = _exception_lines(error)
    except BaseException:
        frames, lines = [], [f"{name}: {message}\n" if message else f"{name}\n"]
    return {"outcome": "exception", "type": name, "message": message, "frames": frames, "lines": lines}


def _exception_lines(error: BaseException) -> list[str]:
    """The exception as the interpreter itself prints it below a traceback."""
    if isinstance(error, SyntaxError):
        if error.filename == PROGRAM_NAME:
            # The caret line differs between Python versions; the line itself is enough.
            error.offset = None
        return list(_TracebackException(type(error), error, None).format_exception_only())
    # Only the interpreter's own display adds hints such as "Did you mean: 'result'?" (the
    # traceback module does too, but only from Python 3.12 on). It needs the innermost
    # frame; the frames above it and any chained exception would only have to be cut off.
    innermost = error.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    if innermost is not None:
        error.__traceback__ = types.TracebackType(
            None, innermost.tb_frame, innermost.tb_lasti, innermost.tb_lineno
        )
    error.__cause__ = None
    error.__suppress_context__ = True
    shown = io.StringIO()
    saved, sys.stderr = sys.stderr, shown
    try:
        _display(type(error), error, error.__traceback__)
    finally:
        sys.stderr = saved
    lines = shown.getvalue().splitlines(keepends=True)
    # Frame lines are indented; the exception's own first line is not.
    for index, line in enumerate(lines):
        if not line.startswith((" ", "Traceback (most recent call last):")):
            return lines[index:]
    return list(_TracebackException(type(error), error, None).format_exception_only())


def _program_frames(tb: types.TracebackType | None) -> list[list]:
    """The program's own frames as [lineno, function, line, repeats], identical runs merged."""
    frames: list[list] = []
    for frame in _extract_tb(tb):
        if frame.filename != PROGRAM_NAME:
            continue
        entry = [frame.lineno, frame.name, (frame.line or "")[:MAX_LINE_CHARS]]
        if frames and frames[-1][:3] == entry:
            frames[-1][3] += 1
        else:
            frames.append([*entry, 1])
    return frames


# --- the dispatcher: run, watch, clean up


class _Tail:
    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > self.keep:
            del self.data[: len(self.data) - self.keep]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def run_program(source: str, limits: Limits) -> dict:
    _make_scratch(limits.scratch)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    result_r, result_w = os.pipe()
    # Drawn for this run only: a message on the result pipe without it was not the harness's.
    token = os.urandom(16).hex()
    started = time.monotonic()
    try:
        pid = os.fork()
    except OSError:
        for fd in (out_r, out_w, err_r, err_w, result_r, result_w):
            os.close(fd)
        raise
    if pid == 0:
        try:
            os.close(out_r)
            os.close(err_r)
            os.close(result_r)
            _child(source, limits, out_w, err_w, result_w, token)
        finally:
            _exit(CHILD_SETUP_FAILED)
    for fd in (out_w, err_w, result_w):
        os.close(fd)
    stdout, stderr = _Tail(limits.tail_bytes), _Tail(limits.tail_bytes)
    result = bytearray()
    watch = _Watch(pid, {out_r: stdout.add, err_r: stderr.add, result_r: result.extend})
    timed_out = overflow = False
    try:
        deadline = started + limits.timeout_s
        while not (watch.child_exited or watch.host_gone):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            watch.poll(remaining)
            if stdout.total + stderr.total > limits.output_bytes or len(result) > MAX_RESULT_BYTES:
                overflow = True
                break
    finally:
        status, cpu = _terminate_all(pid)
        duration = time.monotonic() - started
        if not overflow:
            # Every writer is dead now, so this reaches end of file: output written just
            # before the exit, or by an escaped descendant, is not lost.
            watch.drain()
            overflow = stdout.total + stderr.total > limits.output_bytes
        watch.close()
        _wipe(limits.wipe, limits.scratch)
    if watch.host_gone:
        raise HostGone
    verdict = _verdict(status, bytes(result), token, timed_out, overflow, limits)
    verdict.update(
        scratch=limits.scratch,
        stdout=stdout.text(),
        stderr=stderr.text(),
        stdout_bytes=stdout.total,
        stderr_bytes=stderr.total,
        duration_s=round(duration, 6),
        cpu_s=round(cpu, 6),
    )
    return verdict


class _Watch:
    """The child's pipes, each read into its sink, and the child's exit (a pidfd where the
    kernel has one; otherwise found by polling). Also our own stdin: the host sends nothing
    while a program runs, so stdin turning readable then means the host has gone."""

    def __init__(self, pid: int, sinks: dict) -> None:
        self.pid = pid
        self.sinks = sinks
        self.selector = selectors.DefaultSelector()
        for fd in sinks:
            self.selector.register(fd, selectors.EVENT_READ)
        self.open = set(sinks)
        self.selector.register(0, selectors.EVENT_READ)
        self.host_gone = False
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(pid)
            self.selector.register(self.pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            self.pidfd = None
        self.child_exited = False

    def poll(self, timeout: float) -> None:
        wait = timeout if self.pidfd is not None else min(timeout, 0.005)
        for key, _ in self.selector.select(wait):
            if key.fd == self.pidfd:
                self.child_exited = True
            elif key.fd == 0:
                self.host_gone = True
            else:
                self._read(key.fd)
        if self.pidfd is None:
            self.child_exited = _exited(self.pid)

    def drain(self) -> None:
        for fd in list(self.open):
            while fd in self.open:
                self._read(fd)

    def _read(self, fd: int) -> None:
        chunk = os.read(fd, 65536)
        if chunk:
            self.sinks[fd](chunk)
        else:
            self.selector.unregister(fd)
            os.close(fd)
            self.open.discard(fd)

    def close(self) -> None:
        for fd in self.open:
            os.close(fd)
        self.open.clear()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.selector.close()


def _exited(pid: int) -> bool:
    """True once `pid` has exited; it is left as a zombie for `_terminate_all` to reap."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _terminate_all(pid: int) -> tuple[int, float]:
    """Kill the program and everything it started; return its wait status and CPU seconds."""
    if os.getpid() == 1:
        # As a PID namespace's init, kill(-1) reaches every other process in the sandbox,
        # including descendants that escaped with setsid().
        _kill(pid)
        _kill(-1)
    else:
        _kill(-pid)
        _kill(pid)
    _, status, usage = os.wait4(pid, 0)
    _kill_remaining_children()
    return status, usage.ru_utime + usage.ru_stime


def _kill(target: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(target, signal.SIGKILL)


def _kill_remaining_children() -> None:
    """Kill and reap until no child is left. In a PID namespace orphans are re-parented to us
    (the init); outside one we are a child subreaper, which gives the same guarantee."""
    while True:
        if os.getpid() == 1:
            _kill(-1)
        else:
            for child in _children():
                _kill(child)
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if reaped == 0:
            time.sleep(0.001)


def _children() -> list[int]:
    me = str(os.getpid())
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[1].decode() == me:
            children.append(int(entry))
    return children


def _verdict(status: int, result: bytes, token: str, timed_out: bool, overflow: bool, limits: Limits) -> dict:
    if overflow:
        return _failure(
            "failed",
            "OutputLimitExceeded",
            f"the program wrote more than {limits.output_bytes} bytes of output",
        )
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == CHANNEL_CLOSED:
        # Before the result is read: what reached the pipe came from the program, not the harness.
        return _failure(
            "failed",
            "HarnessChannelClosed",
            "the program closed or replaced the harness's file descriptors before its tests finished",
        )
    message = _parse_result(result, token)
    if message is not None and message.get("outcome") == "passed":
        return {"status": "passed"}
    if message is not None and message.get("outcome") == "exception":
        return {
            "status": "failed",
            "exception_type": message["type"],
            "exception_message": message["message"],
            "frames": message["frames"],
            "exception_lines": message["lines"],
        }
    if timed_out:
        return _failure(
            "timeout", "Timeout", f"the program did not finish within {_seconds(limits.timeout_s)}"
        )
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == signal.SIGXCPU:
            return _failure(
                "timeout", "Timeout", f"the program used more than {_seconds(_cpu_limit(limits))} of CPU time"
            )
        return _failure("failed", "Killed", f"the program was killed by signal {signal.Signals(number).name}")
    if result:
        return _failure(
            "failed",
            "HarnessError",
            "the program wrote on the harness's result channel or corrupted its message",
        )
    code = os.WEXITSTATUS(status)
    if code == CHILD_SETUP_FAILED:
        return _failure("sandbox_error", "SandboxError", "the sandbox could not set up the program's process")
    return _failure("failed", "EarlyExit", f"the program exited with status {code} before its tests finished")


def _cpu_limit(limits: Limits) -> int:
    """A backstop: the wall clock, which the dispatcher watches, must always end a run first."""
    return int(limits.timeout_s + 0.999) + 1


def _seconds(value: float) -> str:
    return f"{value:g} second{'' if value == 1 else 's'}"


def _parse_result(result: bytes, token: str) -> dict | None:
    """The harness's message: one JSON object carrying this run's token."""
    try:
        message = json.loads(result)
    except ValueError:
        return None
    return message if isinstance(message, dict) and message.get("token") == token else None


def _failure(status: str, kind: str, message: str) -> dict:
    return {"status": status, "exception_type": kind, "exception_message": message}


def _make_scratch(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


def _wipe(roots: list[str], scratch: str) -> None:
    """Remove everything the program left in the writable places, whatever permissions it set."""
    for root in [*roots, scratch]:
        try:
            entries = [entry.path for entry in os.scandir(root)]
        except OSError:
            continue
        for path in entries:
            _remove_tree(path)


def _remove_tree(top: str) -> None:
    # Iterative, since a program can nest directories deeper than Python's recursion limit.
    pending, directories = [top], []
    while pending:
        path = pending.pop()
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                os.chmod(path, stat.S_IRWXU)
                pending.extend(entry.path for entry in os.scandir(path))
            except OSError:
                pass
            directories.append(path)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    for path in reversed(directories):
        with contextlib.suppress(OSError):
            os.rmdir(path)


# --- the request loop


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[written:]


def _send(message: dict) -> None:
    _write_all(1, (_dumps(message) + "\n").encode())


def _become_subreaper() -> None:
    """Outside a PID namespace, make orphaned descendants our children so we can kill them."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_child_subreaper = 36
        libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serve(limits: Limits) -> None:
    # Nothing but stdin, stdout and stderr is ours; with the limit this low, a child closes
    # every other descriptor cheaply.
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    for name in PRELOAD:
        __import__(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getpid() != 1:
        _become_subreaper()
    _wipe(limits.wipe, limits.scratch)
    # Objects that exist now are never freed; keeping the collector off them keeps each
    # fork's memory shared with ours instead of copied.
    gc.freeze()
    _send({"hello": PROTOCOL, "python": platform.python_version(), "pid1": os.getpid() == 1})
    requests = sys.stdin.buffer
    while True:
        line = requests.readline()
        if not line:
            return
        try:
            program = json.loads(line)["program"]
            if not isinstance(program, str):
                raise TypeError("program is not a string")
        except (ValueError, KeyError, TypeError) as error:
            _send(_failure("sandbox_error", "SandboxError", f"bad request: {error}"))
            continue
        try:
            answer = run_program(program, limits)
        except HostGone:
            return
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.ENOMEM):
                answer = _failure("sandbox_error", "SandboxError", f"cannot start the program: {error}")
            else:
                raise
        _send(answer)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.stderr.write("usage: dispatcher.py LIMITS_JSON\n")
        sys.exit(2)
    serve(Limits(**json.loads(argv[1])))


if __name__ == "__main__":
    main(sys.argv)
