"""What every backend shares: the dispatcher protocol, a pool of running dispatchers with
recycling and cleanup, and running many programs in parallel with results in input order."""

from __future__ import annotations

import atexit
import hashlib
import json
import queue
import signal
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from types import FrameType, TracebackType
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from leti.config import ExecuteConfig
from leti.errors import LetiError
from leti.records import ExecutionStatus
from leti.sandbox import dispatcher

DISPATCHER_PATH = Path(dispatcher.__file__)
# A dispatcher enforces the program's limits itself; silence for this much longer means
# the dispatcher, not the program, is stuck.
RESULT_GRACE_S = 15.0
START_TIMEOUT_S = 60.0


class SandboxError(LetiError):
    """The sandbox failed, not the program: no engine, no image, a sandbox that will not start."""


class ChannelError(Exception):
    """The connection to one dispatcher broke or went silent; that sandbox is discarded."""


class Program(NamedTuple):
    """What one run executes: `source`, and `tests` to run against it in a process of their own
    (`isolation: separate`); without tests, `source` runs alone, its tests included if it has any.
    `own_builtins`: names of builtins the tests take from the program (a problem whose function is
    called `sum`); any other global of the program named like a builtin is not the tests'."""

    source: str
    tests: str | None = None
    own_builtins: tuple[str, ...] = ()


class RunResult(BaseModel):
    """One program's outcome as the dispatcher reports it."""

    model_config = ConfigDict(frozen=True)

    status: ExecutionStatus
    exception_type: str | None = None
    exception_message: str | None = None
    frames: list[tuple[int, str, str, int]] = Field(
        default_factory=list, description="The program's own frames: line, function, source line, repeats."
    )
    exception_lines: list[str] = Field(
        default_factory=list, description="Python's rendering of the exception itself."
    )
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    scratch: str = Field(default="", description="The program's working directory, to hide from feedback.")


def dispatcher_sha256() -> str:
    return hashlib.sha256(DISPATCHER_PATH.read_bytes()).hexdigest()


def dispatcher_limits(settings: ExecuteConfig, scratch: str, wipe: list[str]) -> str:
    """The dispatcher's command-line argument."""
    return json.dumps(
        {
            "timeout_s": settings.timeout_s,
            "memory_bytes": settings.memory_mb << 20,
            "file_bytes": settings.max_file_mb << 20,
            "processes": settings.max_processes,
            "open_files": 256,
            "output_bytes": settings.max_output_bytes,
            "tail_bytes": settings.output_tail_bytes,
            "scratch": scratch,
            "wipe": wipe,
        }
    )


class Channel(ABC):
    """A byte stream to one dispatcher, carrying one JSON message per line each way."""

    def __init__(self) -> None:
        self._lines = bytearray()

    def send(self, message: dict) -> None:
        try:
            self._write((json.dumps(message) + "\n").encode())
        except (OSError, ValueError) as error:
            raise ChannelError(f"cannot write to the dispatcher: {error}{self._diagnostics()}") from None

    def receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (end := self._lines.find(b"\n")) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChannelError(f"no answer from the dispatcher within {timeout:g} s")
            try:
                chunk = self._read(remaining)
            except (OSError, ValueError) as error:
                raise ChannelError(f"cannot read from the dispatcher: {error}{self._diagnostics()}") from None
            if chunk is None:
                continue
            if not chunk:
                raise ChannelError(f"the dispatcher exited{self._diagnostics()}")
            self._feed(chunk)
        line = bytes(self._lines[:end])
        del self._lines[: end + 1]
        try:
            message = json.loads(line)
        except ValueError:
            raise ChannelError(f"not a message from the dispatcher: {line[:300]!r}") from None
        if not isinstance(message, dict):
            raise ChannelError(f"not a message from the dispatcher: {line[:300]!r}")
        return message

    def _feed(self, chunk: bytes) -> None:
        self._lines += chunk

    def _diagnostics(self) -> str:
        """The dispatcher's own stderr, if the transport captured any."""
        return ""

    @abstractmethod
    def _write(self, data: bytes) -> None: ...

    @abstractmethod
    def _read(self, timeout: float) -> bytes | None:
        """Some bytes; b"" at end of stream; None if `timeout` passed without any."""

    @abstractmethod
    def close(self) -> None: ...


class Sandbox(ABC):
    """One running dispatcher."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.used = 0

    def wait_until_ready(self) -> None:
        hello = self.channel.receive(START_TIMEOUT_S)
        if hello.get("hello") != dispatcher.PROTOCOL:
            raise ChannelError(f"the dispatcher speaks another protocol: {hello}")

    def run(self, program: Program, timeout: float) -> RunResult:
        self.used += 1
        request: dict = {"program": program.source}
        if program.tests is not None:
            request.update(tests=program.tests, own_builtins=list(program.own_builtins))
        self.channel.send(request)
        answer = self.channel.receive(timeout)
        try:
            return RunResult.model_validate(answer)
        except ValidationError as error:
            raise ChannelError(f"a malformed result from the dispatcher: {error}") from None

    @abstractmethod
    def stop(self) -> None:
        """Stop the dispatcher and everything it runs, now; safe to call twice."""


class SandboxPool(ABC):
    """`size` sandboxes, each serving one program at a time. A sandbox is replaced after
    `recycle_every` programs, or when it breaks (the program is then retried once)."""

    def __init__(self, settings: ExecuteConfig, size: int) -> None:
        self.settings = settings
        self.size = size
        self._idle: queue.SimpleQueue[tuple[int, Sandbox | None]] = queue.SimpleQueue()
        self._live: set[Sandbox] = set()
        self._stoppers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._opened = False
        self._closed = False

    @abstractmethod
    def _spawn(self, index: int) -> Sandbox:
        """Start sandbox number `index` (its dispatcher may still be warming up)."""

    def open(self) -> SandboxPool:
        """Start every sandbox; a pool opens once."""
        if self._opened:
            return self
        self._opened = True
        _track(self)
        with ThreadPoolExecutor(self.size) as executor:
            futures = [executor.submit(self._start, index) for index in range(self.size)]
        try:
            sandboxes = [future.result() for future in futures]
        except BaseException:
            self.close()
            raise
        for index, sandbox in enumerate(sandboxes):
            self._idle.put((index, sandbox))
        return self

    def __enter__(self) -> SandboxPool:
        return self.open()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def run(self, program: str | Program) -> RunResult:
        """Run one program; thread-safe, at most `size` at a time make progress."""
        if isinstance(program, str):
            program = Program(program)
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        index, sandbox = self._idle.get()
        try:
            failure: ChannelError | None = None
            for _attempt in range(2):
                if sandbox is not None and sandbox.used >= self.settings.recycle_every:
                    self._retire(sandbox)
                    sandbox = None
                if sandbox is None:
                    sandbox = self._start(index)
                try:
                    return sandbox.run(program, self.settings.timeout_s + RESULT_GRACE_S)
                except ChannelError as error:
                    failure = error
                    self._retire(sandbox)
                    sandbox = None
            return RunResult(
                status=ExecutionStatus.sandbox_error,
                exception_type="SandboxError",
                exception_message=f"the sandbox broke twice running this program: {failure}",
            )
        finally:
            self._idle.put((index, sandbox))

    def _start(self, index: int) -> Sandbox:
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
        sandbox = self._spawn(index)
        with self._lock:
            self._live.add(sandbox)
            closed = self._closed
        if closed:
            self._retire(sandbox)
            raise SandboxError("the sandbox pool is closed")
        try:
            sandbox.wait_until_ready()
        except ChannelError as error:
            self._retire(sandbox)
            raise SandboxError(f"a sandbox did not start: {error}") from None
        return sandbox

    def _retire(self, sandbox: Sandbox) -> None:
        # Stopping a container takes a docker API round trip: do it off the hot path.
        with self._lock:
            self._live.discard(sandbox)
            stopper = threading.Thread(target=sandbox.stop, name="sandbox-stop")
            self._stoppers.append(stopper)
        stopper.start()

    def close(self) -> None:
        """Stop every sandbox and wait until they are gone."""
        with self._lock:
            self._closed = True
            live, self._live = list(self._live), set()
            stoppers, self._stoppers = self._stoppers, []
        with ThreadPoolExecutor(max(1, len(live))) as executor:
            list(executor.map(lambda sandbox: sandbox.stop(), live))
        for stopper in stoppers:
            stopper.join()
        _OPEN_POOLS.discard(self)


def run_programs(
    pool: SandboxPool, programs: Sequence[str | Program], on_result: Callable[[RunResult], None] | None = None
) -> list[RunResult]:
    """Run every program on the pool, `pool.size` at a time; results in input order."""
    results: list[RunResult | None] = [None] * len(programs)
    executor = ThreadPoolExecutor(pool.size, thread_name_prefix="sandbox-run")
    futures: dict[Future[RunResult], int] = {
        executor.submit(pool.run, program): index for index, program in enumerate(programs)
    }
    try:
        for future in as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if on_result is not None:
                on_result(result)
    except BaseException:
        # Do not wait for running programs: the caller closes the pool, which ends them.
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()
    return [result for result in results if result is not None]


# --- cleanup when the process ends: normally, on Ctrl-C (KeyboardInterrupt) or on SIGTERM

_OPEN_POOLS: weakref.WeakSet[SandboxPool] = weakref.WeakSet()


def _track(pool: SandboxPool) -> None:
    _OPEN_POOLS.add(pool)
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(number) is signal.SIG_DFL:
                signal.signal(number, _exit_on_signal)


def _exit_on_signal(number: int, frame: FrameType | None) -> None:
    # Unwinding runs the `with` blocks and atexit handlers that remove the sandboxes.
    raise SystemExit(128 + number)


@atexit.register
def _close_open_pools() -> None:
    for pool in list(_OPEN_POOLS):
        pool.close()
