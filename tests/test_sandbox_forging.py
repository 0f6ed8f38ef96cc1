"""Programs that try to forge a pass, run for real in both backends.

Each case is a solution and a test that the solution fails. Whatever the solution does, to its own
process, the harness, the sandbox's other processes or the channels between them, the verdict must
stay `failed` when the tests run apart from the program (`isolation: separate`, what the execute
stage does for every shipped problem but three).

The same cases also run with the tests in the program's process (`in_process`). There the cases in
`FORGES_IN_PROCESS` do forge a pass, and are strict expected failures: each attack really works
against a harness in the program's reach, so its failure in separate processes is not vacuous.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from leti.config import ExecuteConfig
from leti.execute import program_for
from leti.records import ExecutionStatus, Problem, SandboxImage
from leti.sandbox import SandboxPool, open_pool

SETTINGS = ExecuteConfig(timeout_s=5.0, memory_mb=256)

# The tests every case fails: a plain assert on the solution's function.
TESTS = "assert add(1, 2) == 4\n"
WRONG_ADD = "def add(a, b):\n    return a + b\n"

# A forged message in the harness's format, with every token the program can find.
FORGE_ON_EVERY_DESCRIPTOR = """
import json, os
def _forge(tokens):
    for fd in range(3, 256):
        for token in sorted(set(tokens)) or [None]:
            message = {"outcome": "passed"}
            if token is not None:
                message["token"] = token
            try:
                os.write(fd, json.dumps(message).encode())
            except OSError:
                pass
"""

# Strings of 32 hexadecimal digits anywhere the program can see: a per-run secret looks like one.
HEX_SECRETS = """
import re, sys
_HEX = re.compile(r"^[0-9a-f]{32}$")
def _secrets_in_frames():
    found, frame = [], sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            if isinstance(value, str) and _HEX.match(value):
                found.append(value)
        frame = frame.f_back
    return found
"""

CASES: dict[str, str] = {
    # Replace the function that describes exceptions, found through the callers' globals.
    "patches_the_harness_through_caller_frames": WRONG_ADD
    + """
import sys
frame = sys._getframe()
while frame is not None:
    for name, value in list(frame.f_globals.items()):
        if callable(value) and "describe" in name:
            frame.f_globals[name] = lambda *args, **kwargs: {"outcome": "passed"}
    frame = frame.f_back
""",
    # The harness's own functions, changed in place: every reference to them now runs this code.
    "rewrites_the_code_of_the_harness_functions": WRONG_ADD
    + """
import sys, types
def _passed(*args, **kwargs):
    return {"outcome": "passed"}
frame = sys._getframe()
while frame is not None:
    for value in list(frame.f_globals.values()):
        if isinstance(value, types.FunctionType) and "describe" in value.__name__:
            value.__code__ = _passed.__code__
    frame = frame.f_back
""",
    # json.dumps is shared with the harness: make every message it writes say "passed".
    "rewrites_json_dumps": WRONG_ADD
    + """
import json
def _dumps(value, *args, **kwargs):
    if isinstance(value, dict) and "outcome" in value:
        value = {"outcome": "passed", "token": value.get("token")}
    return __import__("json").JSONEncoder().encode(value)
json.dumps.__code__ = _dumps.__code__
""",
    # Steal the run's secret from the callers' frames, forge a pass with it, leave before the tests.
    "steals_the_token_from_caller_frames_and_exits": WRONG_ADD
    + HEX_SECRETS
    + FORGE_ON_EVERY_DESCRIPTOR
    + """
_forge(_secrets_in_frames())
os._exit(0)
""",
    # The same secret, found among the frames the collector tracks.
    "steals_the_token_with_gc_and_exits": WRONG_ADD
    + FORGE_ON_EVERY_DESCRIPTOR
    + """
import gc, re, types
_hex = re.compile(r"^[0-9a-f]{32}$")
tokens = set()
for value in gc.get_objects():
    if isinstance(value, types.FrameType):
        tokens.update(v for v in value.f_locals.values() if isinstance(v, str) and _hex.match(v))
    elif isinstance(value, dict):
        tokens.update(v for v in value.values() if isinstance(v, str) and _hex.match(v))
    elif isinstance(value, (list, tuple)):
        tokens.update(v for v in value if isinstance(v, str) and _hex.match(v))
_forge(sorted(tokens))
os._exit(0)
""",
    # A pass written on every descriptor, without a secret, then a clean exit.
    "writes_a_pass_on_every_descriptor_and_exits": WRONG_ADD
    + FORGE_ON_EVERY_DESCRIPTOR
    + "_forge([])\nos._exit(0)\n",
    # The same, then the tests run and fail.
    "writes_a_pass_on_every_descriptor_then_fails": WRONG_ADD + FORGE_ON_EVERY_DESCRIPTOR + "_forge([])\n",
    "exits_0_before_the_tests": WRONG_ADD + "import os\nos._exit(0)\n",
    "exits_0_at_exit": WRONG_ADD + "import atexit, os\natexit.register(os._exit, 0)\n",
    # A return value equal to everything: `==` cannot tell it from the right answer.
    "returns_an_always_equal_value": """
class _Anything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    def __hash__(self):
        return 0
def add(a, b):
    return _Anything()
""",
    # Equal to everything and hashing like anything a test could compare it with.
    "returns_an_always_equal_always_hashing_subclass": """
class _Anything(int):
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    def __hash__(self):
        return hash(4)
def add(a, b):
    return _Anything(a + b)
""",
    # A pass written into every descriptor of every other process the program can see: the
    # dispatcher's stdout is the host's channel, and a pipe's read end reopened through /proc
    # writes into that pipe.
    "writes_a_pass_into_every_process_through_proc": WRONG_ADD
    + """
import os
for pid in os.listdir("/proc"):
    if pid.isdigit() and int(pid) != os.getpid():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
                os.write(handle, b'{"status": "passed"}\\n{"outcome": "passed"}\\n')
            except OSError:
                pass
""",
    # Secrets read from every other process's memory, then a pass forged with each, everywhere.
    "reads_secrets_from_other_processes_memory": WRONG_ADD
    + FORGE_ON_EVERY_DESCRIPTOR
    + """
import re
tokens = set()
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    try:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as memory:
            for line in maps:
                start, end = (int(part, 16) for part in line.split()[0].split("-"))
                if "rw" in line.split()[1] and end - start < (64 << 20):
                    memory.seek(start)
                    tokens.update(m.decode() for m in re.findall(rb"[0-9a-f]{32}", memory.read(end - start)))
    except (OSError, ValueError, OverflowError):
        pass
_forge(sorted(tokens)[:64])
""",
    # Every other process of the sandbox killed: the tests' process among them, when there is one.
    "kills_every_other_process": WRONG_ADD
    + """
import os, signal
for pid in os.listdir("/proc"):
    if pid.isdigit() and int(pid) not in (1, os.getpid()):
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
""",
    # Module code that never returns control: the program forks, and the child answers instead.
    "forks_and_exits_the_parent": WRONG_ADD + "import os\nif os.fork():\n    os._exit(0)\n",
    # The interpreter's own int comparison, changed in its type dictionary through gc.
    "patches_int_equality": WRONG_ADD
    + """
import ctypes, gc
slots = gc.get_referents(int.__dict__)[0]
slots["__eq__"] = lambda self, other: True
ctypes.pythonapi.PyType_Modified(ctypes.py_object(int))
""",
    # Every later import of a module the tests use gets the program's version.
    "replaces_a_module_in_sys_modules": WRONG_ADD.replace("return a + b", "return a + b + 0.5")
    + """
import sys, types
fake = types.ModuleType("math")
fake.isclose = lambda *args, **kwargs: True
sys.modules["math"] = fake
""",
    # A global named like a builtin the tests use: in one module, the tests would call it.
    "defines_a_builtin_for_its_tests": WRONG_ADD + "abs = lambda value: 0\n",
    "replaces_a_builtin": WRONG_ADD
    + """
import builtins
builtins.abs = lambda value: 0
""",
}

# The tests of the cases that need one of their own (the others use TESTS).
CASE_TESTS: dict[str, str] = {
    "replaces_a_module_in_sys_modules": "import math\nassert math.isclose(add(1, 2), 3)\n",
    "replaces_a_builtin": "assert abs(add(1, 2) - 4) < 1e-9\n",
    "defines_a_builtin_for_its_tests": "assert abs(add(1, 2) - 4) < 1e-9\n",
    "returns_an_always_equal_always_hashing_subclass": "assert add(1, 2) == 4\nassert add(1, 2) in {4}\n",
}

# Attacks that reach a harness in the program's process (see the module's docstring).
FORGES_IN_PROCESS = {
    "patches_the_harness_through_caller_frames",
    "rewrites_the_code_of_the_harness_functions",
    "rewrites_json_dumps",
    "steals_the_token_from_caller_frames_and_exits",
    "returns_an_always_equal_value",
    "returns_an_always_equal_always_hashing_subclass",
    "replaces_a_module_in_sys_modules",
    "replaces_a_builtin",
    "defines_a_builtin_for_its_tests",
}


def problem_for(case: str) -> Problem:
    return Problem(
        task_id=f"forging/{case}",
        dataset="forging",
        split="test",
        prompt="",
        test_code=CASE_TESTS.get(case, TESTS),
    )


@pytest.fixture(scope="module", params=["docker", "local"])
def pool(request: pytest.FixtureRequest, sandbox_image: SandboxImage) -> Iterator[SandboxPool]:
    settings = SETTINGS.model_copy(update={"backend": request.param})
    with open_pool(settings, 1, sandbox_image) as opened:
        yield opened


@pytest.mark.parametrize("case", list(CASES))
def test_a_program_that_fails_its_test_stays_failed_whatever_it_does(pool: SandboxPool, case: str) -> None:
    problem = problem_for(case)
    assert problem.isolation == "separate"
    result = pool.run(program_for(problem, CASES[case]))
    assert result.status == ExecutionStatus.failed, (
        result.status,
        result.exception_type,
        result.exception_message,
    )


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            marks=pytest.mark.xfail(
                case in FORGES_IN_PROCESS, reason="reaches the harness in the program's process", strict=True
            ),
        )
        for case in CASES
    ],
)
def test_with_the_tests_in_the_programs_process_only_the_known_attacks_forge(
    pool: SandboxPool, case: str
) -> None:
    problem = problem_for(case).model_copy(update={"isolation": "in_process"})
    result = pool.run(program_for(problem, CASES[case]))
    assert result.status == ExecutionStatus.failed, (result.status, result.exception_type)


def test_the_cases_fail_their_tests_without_the_attack(pool: SandboxPool) -> None:
    # The wrong solution alone: its test is a real failure, so a pass above can only be forged.
    wrong = WRONG_ADD.replace("return a + b", "return a + b + 0.5")
    for tests in {TESTS, *CASE_TESTS.values()}:
        problem = Problem(
            task_id="forging/plain", dataset="forging", split="test", prompt="", test_code=tests
        )
        assert pool.run(program_for(problem, wrong)).status == ExecutionStatus.failed, tests
