"""Programs that try to forge a pass, run for real in both backends.

Each case is a solution and a test that the solution fails. Whatever the solution does to the
harness, the verdict must stay `failed`. The cases run as the execute stage runs a sample:
`Problem.program` joins the solution and the tests into one program.

Today the tests run in the program's own process, so a program can reach the harness. The cases in
`FORGES_TODAY` do forge a pass and are strict xfails: they document the hole, prove that each attack
really works against an in-process harness, and turn red the day the tests run where the program
cannot reach them (issue 31), so that their marks are removed with the fix.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from leti.config import ExecuteConfig
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
    "returns_an_always_equal_always_hashing_subclass": "assert add(1, 2) == 4\nassert add(1, 2) in {4}\n",
}

# Attacks that reach today's in-process harness (see the module's docstring).
FORGES_TODAY = {
    "patches_the_harness_through_caller_frames",
    "rewrites_the_code_of_the_harness_functions",
    "rewrites_json_dumps",
    "steals_the_token_from_caller_frames_and_exits",
    "returns_an_always_equal_value",
    "returns_an_always_equal_always_hashing_subclass",
    "replaces_a_module_in_sys_modules",
    "replaces_a_builtin",
}


def program_for(case: str) -> str:
    problem = Problem(
        task_id=f"forging/{case}",
        dataset="forging",
        split="test",
        prompt="",
        test_code=CASE_TESTS.get(case, TESTS),
    )
    return problem.program(CASES[case])


@pytest.fixture(scope="module", params=["docker", "local"])
def pool(request: pytest.FixtureRequest, sandbox_image: SandboxImage) -> Iterator[SandboxPool]:
    settings = SETTINGS.model_copy(update={"backend": request.param})
    with open_pool(settings, 1, sandbox_image) as opened:
        yield opened


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            marks=pytest.mark.xfail(
                case in FORGES_TODAY, reason="forges a pass in-process (issue 31)", strict=True
            ),
        )
        for case in CASES
    ],
)
def test_a_program_that_fails_its_test_stays_failed_whatever_it_does(pool: SandboxPool, case: str) -> None:
    result = pool.run(program_for(case))
    assert result.status == ExecutionStatus.failed, (
        result.status,
        result.exception_type,
        result.exception_message,
    )


def test_the_cases_fail_their_tests_without_the_attack(pool: SandboxPool) -> None:
    # The wrong solution alone: its test is a real failure, so a pass above can only be forged.
    for tests in {TESTS, *CASE_TESTS.values()}:
        problem = Problem(
            task_id="forging/plain", dataset="forging", split="test", prompt="", test_code=tests
        )
        result = pool.run(problem.program(WRONG_ADD.replace("return a + b", "return a + b + 0.5")))
        assert result.status == ExecutionStatus.failed, tests
