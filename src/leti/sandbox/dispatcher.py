"""The program runner that lives inside each sandbox (a container, or bubblewrap for `local`).

It reads one JSON request per line on stdin and answers one JSON result per line on
stdout. Each run forks children from this already-started interpreter, which saves the
~20 ms start of a new Python per program. A child gets its own session, rlimits, /dev/null
as stdin and pipes as stdout/stderr.

A request with `tests` (`isolation: separate`) runs the program in one child and its tests in
another, which never runs the program's code: the tests call the program's functions over a
channel that carries plain values only (numbers, strings, bytes, containers of them, and objects
as their class name and attributes), and the tests' child alone writes the verdict. Nothing the
program does to its own process can make its tests pass: patched builtins, rewritten harness code,
a stolen secret or an object equal to everything stay on its side.

A request without `tests` (`isolation: in_process`, for tests that need the program's own objects)
runs the program, tests included, in one child. "Passed" then comes only from a message the child's
harness writes on a separate pipe after the program ran to its end, so an early `os._exit(0)`
cannot pass; a program that closes or replaces that pipe's descriptor fails with
`HarnessChannelClosed`. Such a program can still reach the harness in its own memory.

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
import socket
import stat
import sys
import time
import traceback
import types

PROTOCOL = 2
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
# The program's process's exit status when the program broke the harness there (isolation separate).
HARNESS_BROKEN = 122
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
_RECURSION_LIMIT = sys.getrecursionlimit()
_BUILTIN_NAMES = frozenset(dir(builtins))


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


def _enter_sandbox(limits: Limits, out_w: int, err_w: int, kept: dict[int, int], workdir: str) -> None:
    """Make this fresh fork a sandboxed process: its own session, /dev/null as stdin, the output
    pipes as stdout and stderr, `kept` ({source fd: target fd}) and no other descriptor, rlimits."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for number in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    # Moved up first, so that no descriptor is overwritten before it is moved.
    staged = {source: os.dup(source) for source in kept}
    for source, target in kept.items():
        os.dup2(staged[source], target)
    for fd in range(3, max(kept.values(), default=2) + 1):
        if fd not in kept.values():
            with contextlib.suppress(OSError):
                os.close(fd)
    os.closerange(max(kept.values(), default=2) + 1, limits.open_files)
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
    os.chdir(workdir)
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


def _as_main(source: str) -> types.ModuleType:
    """A fresh `__main__` module, with `source` as the text of program.py for tracebacks."""
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=PROGRAM_NAME, __builtins__=builtins)
    sys.modules["__main__"] = main
    sys.argv = [PROGRAM_NAME]
    linecache.cache[PROGRAM_NAME] = (len(source), None, source.splitlines(True), PROGRAM_NAME)
    return main


def _give_script_headroom() -> None:
    """A script's module code runs at the bottom of the stack, ours below the harness's frames
    and exec(): raising the recursion limit by their number gives the program the headroom it
    has as a script, so it fails, and its traceback reads, exactly as when run alone."""
    depth, frame = 1, sys._getframe(1)
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    sys.setrecursionlimit(_RECURSION_LIMIT + depth)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def _child(source: str, limits: Limits, out_w: int, err_w: int, result_w: int, token: str) -> None:
    """One program with its tests in one process (`isolation: in_process`)."""
    _enter_sandbox(limits, out_w, err_w, {result_w: RESULT_FD}, limits.scratch)
    channel = _identity(RESULT_FD)
    main = _as_main(source)
    sys.path[0] = limits.scratch
    harness_pid = os.getpid()
    _give_script_headroom()
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
    _flush_output()
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


# --- isolation separate: the program in one process, its tests in another


CALLS_FD = 4
# What crosses between the two processes: at most this many values in one message, nested at
# most this deep, and at most this many items drawn from an iterator the program returns.
MAX_VALUES = 1_000_000
MAX_DEPTH = 200
MAX_ITERATOR_ITEMS = 100_000
PR_SET_DUMPABLE = 4
UNSENDABLE = "UnsendableValue"


class _Unsendable(Exception):
    """A value that cannot cross between the processes."""


class _Corrupted(BaseException):
    """The program's process wrote something that is not a message of the harness's."""


class _ProgramGone(BaseException):
    """The program's process ended or closed its channel while the tests needed it."""


class _CannotCross(BaseException):
    """The tests pass the program a value that cannot cross: the problem needs in_process."""


def _joined(source: str, tests: str) -> str:
    """The one program `isolation: in_process` runs, as `Problem.program` writes it."""
    return f"{source}\n{tests}"


class _Calls:
    """One end of the channel between the program's process and the tests', one JSON message a line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def send(self, message: dict) -> None:
        _write_all(self.fd, (_dumps(message) + "\n").encode())

    def receive(self) -> dict | None:
        """The next message; None at the end of the stream."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                break
            if len(self.buffer) > MAX_RESULT_BYTES:
                raise _Corrupted("a message longer than the harness allows")
            try:
                chunk = os.read(self.fd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                return None
            self.buffer += chunk
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        try:
            message = json.loads(line)
        except ValueError:
            raise _Corrupted("a message that is not JSON") from None
        if not isinstance(message, dict):
            raise _Corrupted("a message that is not an object")
        return message


def _encode(value, handles: list | None, budget: list[int], depth: int = 0):
    """`value` as JSON, every container tagged. With `handles` (the program's side), callables
    cross as handles and other objects as their class name and attributes; without (the tests'
    side), those raise _Unsendable. Subclasses of builtins cross as their builtin base."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _Unsendable(f"it holds more than {MAX_VALUES} values")
    if depth > MAX_DEPTH:
        raise _Unsendable(f"it is nested more than {MAX_DEPTH} deep")
    if value is None or isinstance(value, bool):
        return value if value is None else bool(value)
    if isinstance(value, int):
        number = int.__index__(value)
        return number if -(1 << 53) < number < 1 << 53 else ["int", hex(number)]
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    deeper = depth + 1

    def each(items) -> list:
        return [_encode(item, handles, budget, deeper) for item in items]

    if isinstance(value, complex):
        return ["complex", value.real, value.imag]
    if isinstance(value, (bytes, bytearray)):
        return ["bytearray" if isinstance(value, bytearray) else "bytes", bytes(value).hex()]
    if isinstance(value, list):
        return ["list", each(value)]
    if isinstance(value, tuple):
        return ["tuple", each(value)]
    if isinstance(value, dict):
        return ["dict", [each(pair) for pair in dict.items(value)]]
    if isinstance(value, (set, frozenset)):
        return ["frozenset" if isinstance(value, frozenset) else "set", each(value)]
    if isinstance(value, range):
        return ["range", value.start, value.stop, value.step]
    view = _VIEWS.get(type(value))
    if view is not None:
        return [
            view,
            [each(item) if view == "items" else _encode(item, handles, budget, deeper) for item in value],
        ]
    if type(value).__name__ == "deque" and type(value).__module__ == "collections":
        return ["deque", each(value)]
    if type(value).__name__ == "Fraction" and type(value).__module__ == "fractions":
        return ["fraction", _encode(value.numerator, None, budget), _encode(value.denominator, None, budget)]
    if type(value).__name__ == "Decimal" and type(value).__module__ == "decimal":
        return ["decimal", str(value)]
    if isinstance(value, type) and getattr(builtins, value.__name__, None) is value:
        return ["type", value.__name__]
    if handles is None:
        raise _Unsendable(f"a {type(value).__name__} cannot be sent to another process")
    if isinstance(value, (type, types.ModuleType)):
        raise _Unsendable(f"a {type(value).__name__} cannot be sent to the tests")
    if hasattr(value, "__next__") and hasattr(value, "__iter__"):
        items = []
        for item in value:
            items.append(item)
            if len(items) > MAX_ITERATOR_ITEMS:
                raise _Unsendable(
                    f"an iterator of more than {MAX_ITERATOR_ITEMS} items cannot be sent to the tests"
                )
        return ["iterator", each(items)]
    if callable(value):
        handles.append(value)
        return ["callable", len(handles) - 1, str(getattr(value, "__name__", "function"))]
    return [
        "object",
        type(value).__name__,
        [[name, _encode(item, handles, budget, deeper)] for name, item in _attributes(value).items()],
    ]


def _attributes(value) -> dict:
    """An object's instance attributes, from its __dict__ and its slots; none for an object of a
    builtin or extension type (an `re.Match` crosses as an object with no attributes, unequal to
    anything else, as a test comparing it with a tuple finds it in the program's process)."""
    found = {}
    for kind in reversed(type(value).__mro__):
        slots = kind.__dict__.get("__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                found[str(name)] = getattr(value, name)
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict):
        found.update((str(name), item) for name, item in attributes.items())
    return found


_VIEWS = {type({}.keys()): "keys", type({}.values()): "values", type({}.items()): "items"}


class _Inert:
    """What an object that is not plain data is in the tests' process: its class name and its
    attributes, and nothing of the program's code."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} object>"


def _decode(value, classes: dict, remote, depth: int = 0):
    """A value `_encode` wrote, built from builtins only. `classes` names the inert classes made so
    far; `remote(handle, name)` makes a callable that calls into the program, or is None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > MAX_DEPTH or not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise _Corrupted("a value the harness did not encode")
    tag, deeper = value[0], depth + 1

    def each(items) -> list:
        if not isinstance(items, list):
            raise _Corrupted("a value the harness did not encode")
        return [_decode(item, classes, remote, deeper) for item in items]

    try:
        if tag in _SEQUENCES:
            return _SEQUENCES[tag](each(value[1]))
        if tag == "dict":
            return dict(tuple(each(pair)) for pair in value[1])
        if tag == "int":
            return int(value[1], 16)
        if tag in ("bytes", "bytearray"):
            return (bytes if tag == "bytes" else bytearray).fromhex(value[1])
        if tag == "complex":
            return complex(float(value[1]), float(value[2]))
        if tag == "range":
            return range(*(int(part) for part in value[1:4]))
        if tag == "keys":
            return dict.fromkeys(each(value[1])).keys()
        if tag == "values":
            return dict(enumerate(each(value[1]))).values()
        if tag == "items":
            return dict(tuple(each(pair)) for pair in value[1]).items()
        if tag == "deque":
            return __import__("collections").deque(each(value[1]))
        if tag == "fraction":
            return __import__("fractions").Fraction(
                _decode(value[1], classes, None), _decode(value[2], classes, None)
            )
        if tag == "decimal":
            return __import__("decimal").Decimal(str(value[1]))
        if tag == "iterator":
            return iter(each(value[1]))
        if tag == "type":
            kind = getattr(builtins, str(value[1]))
            if isinstance(kind, type):
                return kind
        if tag == "callable" and remote is not None:
            return remote(int(value[1]), str(value[2]))
        if tag == "object":
            instance = _inert_class(str(value[1]), classes)()
            for name, item in value[2]:
                instance.__dict__[str(name)] = _decode(item, classes, remote, deeper)
            return instance
    except _Corrupted:
        raise
    except Exception:
        raise _Corrupted("a value the harness did not encode") from None
    raise _Corrupted("a value the harness did not encode")


_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def _inert_class(name: str, classes: dict) -> type:
    if name not in classes:
        classes[name] = type(name, (_Inert,), {"__module__": "__main__", "__qualname__": name})
    return classes[name]


# --- the program's process


def _program_child(source: str, tests: str, limits: Limits, out_w: int, err_w: int, calls_w: int) -> None:
    _enter_sandbox(limits, out_w, err_w, {calls_w: CALLS_FD}, limits.scratch)
    main = _as_main(_joined(source, tests))
    sys.path[0] = limits.scratch
    harness_pid = os.getpid()
    _give_script_headroom()
    try:
        _answer_the_tests(source, tests, main, _Calls(CALLS_FD), harness_pid)
    except OSError:
        pass  # the tests' process has gone
    except BaseException:
        # Once the program has run, a harness that fails in its process is the program's doing.
        _exit(0 if os.getpid() != harness_pid else HARNESS_BROKEN)
    _exit(0)


def _answer_the_tests(
    source: str, tests: str, main: types.ModuleType, calls: _Calls, harness_pid: int
) -> None:
    handles: list = []
    try:
        exec(_compiled_program(source, tests), main.__dict__)
        message = {"ready": _listing(main.__dict__, handles)}
    except BaseException as error:
        message = {"module_error": _describe(error)}
    if os.getpid() != harness_pid:
        _exit(0)
    _flush_output()
    calls.send(message)
    if "ready" in message:
        _serve_calls(calls, main.__dict__, handles, harness_pid)


def _compiled_program(source: str, tests: str) -> types.CodeType:
    """The program's code. Where it does not compile, the error is the one the program joined with its
    tests gives, as when both run in one process; unless only the tests made it compile (it ends
    inside a string that swallows them), then the program's own."""
    try:
        return compile(source, PROGRAM_NAME, "exec", dont_inherit=True)
    except SyntaxError:
        compile(_joined(source, tests), PROGRAM_NAME, "exec", dont_inherit=True)
        raise


def _listing(namespace: dict, handles: list) -> list:
    """The program's global names, each as [name, kind, what the tests' process needs of it]."""
    listing = []
    for name, value in list(namespace.items()):
        if name.startswith("__") and name.endswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            listing.append([name, "module", value.__name__])
        elif isinstance(value, type):
            listing.append([name, "class", value.__name__])
        elif callable(value):
            listing.append([name, "function", str(getattr(value, "__name__", name))])
        elif hasattr(value, "__next__"):
            # Drawing its items to send them would leave the program's own iterator exhausted.
            listing.append([name, "opaque", type(value).__name__])
        else:
            try:
                listing.append([name, "value", _encode(value, handles, [MAX_VALUES])])
            except Exception:
                listing.append([name, "opaque", type(value).__name__])
    return listing


def _serve_calls(calls: _Calls, namespace: dict, handles: list, harness_pid: int) -> None:
    """Answer the tests' calls until they close the channel."""
    classes: dict = {}
    while True:
        request = calls.receive()
        if request is None:
            return
        try:
            target = handles[request["handle"]] if "handle" in request else namespace[request["name"]]
            args = [_decode(item, classes, None) for item in request["args"]]
            kwargs = {str(key): _decode(item, classes, None) for key, item in request["kwargs"]}
        except (LookupError, TypeError, ValueError, _Corrupted):
            raise _Corrupted("a call the tests' process did not make") from None
        try:
            value = _call_as_tests_do(target, args, kwargs)
            reply = {
                "returned": _encode(value, handles, [MAX_VALUES]),
                "args": [_changed(item, handles) for item in args],
                "kwargs": [[key, _changed(item, handles)] for key, item in kwargs.items()],
            }
        except _Unsendable as error:
            reply = {"raised": _failure_of_value(str(error))}
        except BaseException as error:
            reply = {"raised": _describe(error), "bases": _builtin_bases(type(error))}
        if os.getpid() != harness_pid:
            # A process the program forked returned through the harness.
            _exit(0)
        _flush_output()
        calls.send(reply)


_CALL = compile("returned = target(*args, **kwargs)", "<harness>", "exec")


def _call_as_tests_do(target, args: list, kwargs: dict):
    """`target(*args, **kwargs)` under exec() and with a script's headroom, as the tests call it when
    they run in the program's process: a recursive function fails at the same depth either way."""
    namespace = {"target": target, "args": args, "kwargs": kwargs}
    _give_script_headroom()
    exec(_CALL, namespace)
    return namespace["returned"]


def _changed(value, handles: list):
    """A mutable argument after the call, which the tests' process copies into its own; else None."""
    if type(value) in (list, dict, set, bytearray):
        try:
            return _encode(value, handles, [MAX_VALUES])
        except _Unsendable:
            return None
    return None


def _failure_of_value(reason: str) -> dict:
    message = f"the program's value cannot be sent to its tests: {reason}"
    return {
        "outcome": "exception",
        "type": UNSENDABLE,
        "message": message,
        "frames": [],
        "lines": [f"{UNSENDABLE}: {message}\n"],
    }


def _builtin_bases(kind: type) -> list[str]:
    return [base.__name__ for base in kind.__mro__ if base.__module__ == "builtins"]


# --- the tests' process


def _tests_child(
    source: str,
    tests: str,
    own_builtins: frozenset,
    limits: Limits,
    out_w: int,
    err_w: int,
    result_w: int,
    calls_r: int,
    token: str,
) -> None:
    _enter_sandbox(limits, out_w, err_w, {result_w: RESULT_FD, calls_r: CALLS_FD}, "/")
    # Only the interpreter's own, read-only folders: the program may write modules anywhere else.
    sys.path[:] = [entry for entry in sys.path[1:] if entry and not os.access(entry, os.W_OK)]
    main = _as_main(_joined(source, tests))
    result = _run_tests(source, tests, own_builtins, main, _Calls(CALLS_FD))
    result["token"] = token
    _flush_output()
    _write_all(RESULT_FD, _dumps(result).encode())
    _exit(0)


class _Program:
    """The tests' view of the program's process: calls go out, plain values come back."""

    def __init__(self, calls: _Calls) -> None:
        self.calls = calls
        self.classes: dict = {}
        self.broken: BaseException | None = None

    def call(self, address: dict, args: tuple, kwargs: dict):
        if self.broken is not None:
            raise self.broken
        budget = [MAX_VALUES]
        try:
            request = dict(
                address,
                args=_encode(list(args), None, budget)[1],
                kwargs=[[key, _encode(item, None, budget)] for key, item in kwargs.items()],
            )
        except _Unsendable as error:
            raise _CannotCross(f"the tests pass the program a value that cannot cross: {error}") from None
        # The tests' output so far, before the program's: printed in one process, it would come first.
        _flush_output()
        try:
            self.calls.send(request)
            reply = self.calls.receive()
            if reply is None:
                raise _ProgramGone()
            if "raised" not in reply:
                return self._returned(reply, args, kwargs)
            error = _remote_exception(reply["raised"], reply.get("bases", []))
        except OSError:
            self.broken = _ProgramGone()
            raise self.broken from None
        except (_ProgramGone, _Corrupted) as broken:
            # Kept, so that no verdict but a failure comes out however the tests handle it.
            self.broken = broken
            raise
        raise error

    def _returned(self, reply: dict, args: tuple, kwargs: dict):
        try:
            value = self.decode(reply["returned"])
            changes = [(args[index], after) for index, after in enumerate(reply["args"][: len(args)])]
            changes += [(kwargs.get(str(key)), after) for key, after in reply["kwargs"]]
        except (KeyError, IndexError, TypeError, ValueError):
            raise _Corrupted("a reply the harness did not write") from None
        for sent, after in changes:
            if after is not None:
                _copy_into(sent, self.decode(after))
        return value

    def decode(self, value):
        return _decode(value, self.classes, self.remote)

    def remote(self, handle: int, name: str):
        return _Remote(self, {"handle": handle}, name)


class _Remote:
    """A function of the program, called from the tests."""

    def __init__(self, program: _Program, address: dict, name: str) -> None:
        self._program = program
        self._address = address
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        return self._program.call(self._address, args, kwargs)

    def __repr__(self) -> str:
        return f"<function {self.__name__}>"


def _copy_into(sent, after) -> None:
    """The program changed a list, dict, set or bytearray the tests passed: so does their copy."""
    if type(sent) is not type(after):
        return
    if isinstance(sent, (list, bytearray)):
        sent[:] = after
    elif isinstance(sent, (dict, set)):
        sent.clear()
        sent.update(after)


def _remote_exception(description, bases) -> BaseException:
    """The program's exception as one the tests can catch: of a builtin class its own derives from,
    named as the program named it, carrying the program's description of it."""
    if not isinstance(description, dict) or not isinstance(bases, list):
        raise _Corrupted("an exception the harness did not describe")
    kind = BaseException
    for name in bases:
        candidate = getattr(builtins, str(name), None)
        if isinstance(candidate, type) and issubclass(candidate, BaseException):
            kind = candidate
            break
    name = str(description.get("type", kind.__name__))
    if name != kind.__name__:
        kind = type(name, (kind,), {})
    try:
        error = kind(str(description.get("message", "")))
    except Exception:
        error = Exception(str(description.get("message", "")))
    error._leti_program = description
    return error


def _namespace(listing, program: _Program, tests_code, own_builtins: frozenset) -> dict:
    """The tests' globals: the program's names, as calls into it, copies of its values, the same
    modules imported afresh, and inert stand-ins for the rest; but not its names of builtins other
    than `own_builtins`: a program that defines `abs` or `sorted` does not define them for its tests."""
    if not isinstance(listing, list):
        raise _Corrupted("a listing the harness did not write")
    referenced = _names_in(tests_code)
    namespace = {}
    for entry in listing:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
        ):
            raise _Corrupted("a listing the harness did not write")
        name, kind, detail = entry
        if name in _BUILTIN_NAMES and name not in own_builtins:
            continue
        if kind == "function":
            namespace[name] = _Remote(program, {"name": name}, str(detail))
        elif kind == "module" and name in referenced:
            namespace[name] = _module_for_tests(str(detail), program)
        elif kind == "value":
            namespace[name] = program.decode(detail)
        else:
            namespace[name] = _inert_class(str(detail), program.classes)
            if kind != "class":
                namespace[name] = namespace[name]()
    return namespace


def _module_for_tests(name: str, program: _Program):
    try:
        return __import__("importlib").import_module(name)
    except Exception:
        return _inert_class(name, program.classes)()


def _names_in(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names_in(constant)
    return names


def _run_tests(
    source: str, tests: str, own_builtins: frozenset, main: types.ModuleType, calls: _Calls
) -> dict:
    """The tests' outcome, decided here, where nothing of the program runs."""
    program = _Program(calls)
    try:
        first = calls.receive()
        if first is None:
            return {"outcome": "program_gone"}
        if "module_error" in first:
            return _checked(first["module_error"])
        # Padded so that the tests' lines keep their numbers in the joined program.
        code = compile("\n" * (source.count("\n") + 1) + tests, PROGRAM_NAME, "exec", dont_inherit=True)
        main.__dict__.update(_namespace(first.get("ready"), program, code, own_builtins))
    except _Corrupted:
        return {"outcome": "harness_error"}
    _give_script_headroom()
    try:
        exec(code, main.__dict__)
        outcome = {"outcome": "passed"}
    except BaseException as error:
        outcome = _described_in_tests(error)
    if isinstance(program.broken, _ProgramGone):
        return {"outcome": "program_gone"}
    if isinstance(program.broken, _Corrupted):
        return {"outcome": "harness_error"}
    return outcome


def _described_in_tests(error: BaseException) -> dict:
    if isinstance(error, _ProgramGone):
        return {"outcome": "program_gone"}
    if isinstance(error, _Corrupted):
        return {"outcome": "harness_error"}
    if isinstance(error, _CannotCross):
        return {"outcome": "cannot_cross", "message": str(error)}
    description = getattr(error, "_leti_program", None)
    if description is None:
        return _describe(error)
    try:
        remote = _checked(description)
    except _Corrupted:
        return {"outcome": "harness_error"}
    # The tests' frames down to the call, then the program's own.
    frames = _program_frames(error.__traceback__) + remote["frames"]
    merged: list[list] = []
    for frame in frames:
        if merged and merged[-1][:3] == frame[:3]:
            merged[-1][3] += frame[3]
        else:
            merged.append(list(frame))
    remote["frames"] = merged
    return remote


def _checked(description) -> dict:
    """A description the program's process sent, checked to be one `_describe` writes."""
    try:
        frames = [
            [int(line), str(name), str(text), int(repeats)]
            for line, name, text, repeats in description["frames"]
        ]
        return {
            "outcome": "exception",
            "type": str(description["type"]),
            "message": str(description["message"]),
            "frames": frames,
            "lines": [str(line) for line in description["lines"]],
        }
    except (KeyError, TypeError, ValueError):
        raise _Corrupted("an exception the harness did not describe") from None


def _tested_verdict(run: _Run, token: str, limits: Limits) -> dict:
    """The verdict of a program and its tests in two processes: only the tests' process speaks."""
    tests_status, program_status = run.statuses
    message = _parse_result(run.result, token)
    if run.overflow:
        return _failure(
            "failed",
            "OutputLimitExceeded",
            f"the program wrote more than {limits.output_bytes} bytes of output",
        )
    outcome = message.get("outcome") if message is not None else None
    if outcome == "passed":
        return {"status": "passed"}
    if outcome == "exception":
        return {
            "status": "failed",
            "exception_type": message["type"],
            "exception_message": message["message"],
            "frames": message["frames"],
            "exception_lines": message["lines"],
        }
    if outcome == "harness_error":
        return _failure(
            "failed", "HarnessError", "the program wrote on the harness's channel or corrupted its messages"
        )
    if outcome == "cannot_cross":
        return _failure(
            "sandbox_error",
            "SandboxError",
            f"{message.get('message')}; this problem needs isolation: in_process",
        )
    if outcome == "program_gone":
        if os.WIFEXITED(program_status) and os.WEXITSTATUS(program_status) == HARNESS_BROKEN:
            return _failure(
                "failed",
                "HarnessError",
                "the program broke the harness in its process before its tests finished",
            )
        # Why the program's process ended, as a single process's end is read.
        return _verdict(program_status, b"", token, run.timed_out, False, limits)
    if run.timed_out:
        return _failure(
            "timeout", "Timeout", f"the program did not finish within {_seconds(limits.timeout_s)}"
        )
    if os.WIFSIGNALED(tests_status) and os.WTERMSIG(tests_status) == signal.SIGXCPU:
        return _failure(
            "timeout", "Timeout", f"the tests used more than {_seconds(_cpu_limit(limits))} of CPU time"
        )
    if os.WIFEXITED(tests_status) and os.WEXITSTATUS(tests_status) == CHILD_SETUP_FAILED:
        return _failure("sandbox_error", "SandboxError", "the sandbox could not set up the tests' process")
    return _failure("failed", "TestsInterrupted", "the program stopped the process that runs its tests")


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
    """One program, its tests included, in one process (`isolation: in_process`)."""
    # Drawn for this run only: a message on the result pipe without it was not the harness's.
    token = os.urandom(16).hex()

    def launch(out_w: int, err_w: int, result_w: int) -> list[int]:
        return [_fork(lambda: _child(source, limits, out_w, err_w, result_w, token))]

    run = _supervise(launch, limits)
    verdict = _verdict(run.statuses[0], run.result, token, run.timed_out, run.overflow, limits)
    return run.report(verdict, limits)


def run_tested_program(
    source: str, tests: str, limits: Limits, own_builtins: frozenset = frozenset()
) -> dict:
    """A program and its tests in two processes (`isolation: separate`): the program's process
    runs `source` and answers calls; the tests' process, which never runs the program's code,
    runs `tests` against the program's functions and alone writes the verdict. Of the program's
    globals named like builtins, the tests take only those in `own_builtins`."""
    token = os.urandom(16).hex()

    def launch(out_w: int, err_w: int, result_w: int) -> list[int]:
        tests_end, program_end = (end.detach() for end in socket.socketpair())
        try:
            # The program first: it runs its module code while the tests' process starts.
            program_pid = _fork(
                lambda: _program_child(source, tests, limits, out_w, err_w, program_end),
                close=(tests_end, result_w),
            )
            try:
                tests_pid = _fork(
                    lambda: _tests_child(
                        source, tests, own_builtins, limits, out_w, err_w, result_w, tests_end, token
                    ),
                    close=(program_end,),
                )
            except OSError:
                _terminate_all([program_pid])
                raise
        finally:
            os.close(tests_end)
            os.close(program_end)
        return [tests_pid, program_pid]

    run = _supervise(launch, limits)
    verdict = _tested_verdict(run, token, limits)
    return run.report(verdict, limits)


def _fork(body, close: tuple[int, ...] = ()) -> int:
    """Run `body` in a child; it must end in `_exit`, and a child it fails to reach that in
    exits with CHILD_SETUP_FAILED. `close`: the parent's descriptors the child must not hold."""
    pid = os.fork()
    if pid == 0:
        try:
            for fd in close:
                os.close(fd)
            body()
        finally:
            _exit(CHILD_SETUP_FAILED)
    return pid


class _Run:
    """What one supervised run left: the children's wait statuses (the watched one first), the
    result pipe's bytes, the output tails, and whether the clock or the output limit ended it."""

    def __init__(self, statuses: list[int], result: bytes, stdout: _Tail, stderr: _Tail) -> None:
        self.statuses = statuses
        self.result = result
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = False
        self.overflow = False
        self.duration = 0.0
        self.cpu = 0.0

    def report(self, verdict: dict, limits: Limits) -> dict:
        verdict.update(
            scratch=limits.scratch,
            stdout=self.stdout.text(),
            stderr=self.stderr.text(),
            stdout_bytes=self.stdout.total,
            stderr_bytes=self.stderr.total,
            duration_s=round(self.duration, 6),
            cpu_s=round(self.cpu, 6),
        )
        return verdict


def _supervise(launch, limits: Limits) -> _Run:
    """Start the children with `launch` (given the write ends of stdout, stderr and the result
    pipe; it returns their pids, the one to wait for first), watch until that one exits, the
    clock runs out or the output overflows, then kill everything and clean up."""
    _make_scratch(limits.scratch)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    result_r, result_w = os.pipe()
    started = time.monotonic()
    try:
        pids = launch(out_w, err_w, result_w)
    except OSError:
        for fd in (out_r, err_r, result_r):
            os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w, result_w):
            os.close(fd)
    stdout, stderr = _Tail(limits.tail_bytes), _Tail(limits.tail_bytes)
    result = bytearray()
    watch = _Watch(pids[0], {out_r: stdout.add, err_r: stderr.add, result_r: result.extend})
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
        statuses, cpu = _terminate_all(pids)
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
    run = _Run(statuses, bytes(result), stdout, stderr)
    run.timed_out, run.overflow, run.duration, run.cpu = timed_out, overflow, duration, cpu
    return run


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


def _terminate_all(pids: list[int]) -> tuple[list[int], float]:
    """Kill the children and everything they started; return their wait statuses and CPU seconds."""
    for pid in pids:
        _kill(pid)
        if os.getpid() != 1:
            _kill(-pid)
    if os.getpid() == 1:
        # As a PID namespace's init, kill(-1) reaches every other process in the sandbox,
        # including descendants that escaped with setsid().
        _kill(-1)
    statuses, cpu = [], 0.0
    for pid in pids:
        _, status, usage = os.wait4(pid, 0)
        statuses.append(status)
        cpu += usage.ru_utime + usage.ru_stime
    _kill_remaining_children()
    return statuses, cpu


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


def _undumpable() -> None:
    """No ptrace, and no /proc/PID/fd, mem or environ of this process (nor of the children forked from
    it, which inherit this) for another process of the same user: a program could otherwise write a
    forged result on the host's channel through /proc/PID/fd/1, or read a secret from memory."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


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
    for name in (*PRELOAD, "ctypes", "importlib"):
        __import__(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _undumpable()
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
            request = json.loads(line)
            program, tests = request["program"], request.get("tests")
            own_builtins = request.get("own_builtins", [])
            if not isinstance(program, str) or not isinstance(tests, (str, type(None))):
                raise TypeError("program and tests must be strings")
            if not (isinstance(own_builtins, list) and all(isinstance(name, str) for name in own_builtins)):
                raise TypeError("own_builtins must be a list of names")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            _send(_failure("sandbox_error", "SandboxError", f"bad request: {error}"))
            continue
        try:
            answer = (
                run_program(program, limits)
                if tests is None
                else run_tested_program(program, tests, limits, frozenset(own_builtins))
            )
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
