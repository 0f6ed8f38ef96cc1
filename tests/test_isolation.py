"""The tests apart from the program (`isolation: separate`) against the tests in its process
(`in_process`), through one dispatcher on this host: the same verdict and the same feedback for
ordinary programs, and clear failures where a value cannot cross between the two processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from leti.execute import builtins_defined, program_for
from leti.records import Problem

DISPATCHER = REPO / "src" / "leti" / "sandbox" / "dispatcher.py"
# What differs between any two runs, however the tests ran.
RUN_FIELDS = ("duration_s", "cpu_s", "scratch")


class Dispatcher:
    def __init__(self, scratch: Path) -> None:
        limits = {
            "timeout_s": 3,
            "memory_bytes": 1 << 30,
            "file_bytes": 1 << 20,
            "processes": 256,
            "open_files": 64,
            "output_bytes": 1 << 20,
            "tail_bytes": 4096,
            "scratch": str(scratch),
            "wipe": [],
        }
        self.process = subprocess.Popen(
            [sys.executable, str(DISPATCHER), json.dumps(limits)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert json.loads(self.process.stdout.readline())["hello"] == 2

    def run(self, source: str, tests: str | None = None, own_builtins: tuple[str, ...] = ()) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        request: dict = {"program": source}
        if tests is not None:
            request.update(tests=tests, own_builtins=list(own_builtins))
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        result = json.loads(self.process.stdout.readline())
        for field in RUN_FIELDS:
            result.pop(field)
        return result

    def both(self, source: str, tests: str) -> tuple[dict, dict]:
        """(tests in the program's process, tests apart), as the execute stage joins them."""
        return self.run(f"{source}\n{tests}"), self.run(source, tests)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def dispatcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dispatcher]:
    running = Dispatcher(tmp_path_factory.mktemp("isolation") / "run")
    yield running
    running.close()


ADD = "def add(a, b):\n    return a + b\n"

# (program, tests): each gets the same result, feedback included, however its tests run.
SAME_EITHER_WAY = {
    "passes": (ADD, "assert add(1, 2) == 3\n"),
    "fails_an_assert": (ADD, "assert add(1, 2) == 4\n"),
    "raises_in_the_function": ("def add(a, b):\n    return a / 0\n", "assert add(1, 2) == 3\n"),
    "misspells_a_name": ("def add(a, b):\n    return resutl\nresult = 1\n", "assert add(1, 2) == 3\n"),
    "tests_call_a_missing_function": (ADD, "assert ad(1, 2) == 3\n"),
    "ends_inside_a_definition": ("def add(a, b):\n", "assert add(1, 2) == 3\n"),
    "does_not_compile": ("def add(a, b)\n    return a + b\n", "assert add(1, 2) == 3\n"),
    "fails_at_module_level": ("import no_such_module\n" + ADD, "assert add(1, 2) == 3\n"),
    "exits_inside_the_function": ("import os\ndef add(a, b):\n    os._exit(0)\n", "assert add(1, 2) == 3\n"),
    "exits_inside_a_bare_except": (
        "import os\ndef add(a, b):\n    os._exit(0)\n",
        "try:\n    add(1, 2)\nexcept:\n    pass\nassert True\n",
    ),
    "keeps_its_module_iterator": (
        "numbers = iter([1, 2, 3])\ndef take():\n    return next(numbers)\n",
        "assert take() == 1\nassert take() == 2\nassert take() == 4\n",
    ),
    "sys_exit_inside_the_function": (
        "import sys\ndef add(a, b):\n    sys.exit(3)\n",
        "assert add(1, 2) == 3\n",
    ),
    "recurses_forever": ("def add(a, b):\n    return add(a, b)\n", "add(1, 2)\n"),
    "loops_forever": ("def add(a, b):\n    while True:\n        pass\n", "add(1, 2)\n"),
    "prints_from_both_sides": (
        "print('module')\ndef add(a, b):\n    print('add', a, b)\n    return a + b\n",
        "print('tests')\nassert add(1, 2) == 3\nprint('after')\nassert add(2, 2) == 3\n",
    ),
    "mutates_its_argument": (
        "def fill(xs, table):\n    xs.append(1)\n    table['k'] = {2}\n",
        "xs, table = [], {}\nfill(xs, table=table)\nassert xs == [1] and table == {'k': {2}}\n",
    ),
    "returns_containers": (
        "def f():\n    return [1, (2.5, 'x', b'y'), {3: {4}}, frozenset({5}), None, True, 2**80, -0.0, 1j]\n",
        "assert f() == [1, (2.5, 'x', b'y'), {3: {4}}, frozenset({5}), None, True, 2**80, -0.0, 1j]\n"
        "assert type(f()[1]) is tuple and str(f()[7]) == '-0.0'\n",
    ),
    "returns_an_iterator_not_a_list": (
        "def f(xs):\n    return map(str, xs)\n",
        "assert list(f([1, 2])) == ['1', '2']\nassert f([1]) == ['1']\n",
    ),
    "returns_library_values": (
        "from collections import Counter, OrderedDict, deque, namedtuple\nfrom fractions import Fraction\n"
        "from decimal import Decimal\nPoint = namedtuple('Point', 'x y')\n"
        "def f():\n    return Counter('aab'), OrderedDict(a=1), deque([1]), Point(1, 2), Fraction(1, 2), "
        "Decimal('0.5'), range(3), {'a': 1}.keys()\n",
        "c, o, d, p, q, e, r, k = f()\nassert c == {'a': 2, 'b': 1} and o == {'a': 1} and p == (1, 2)\n"
        "assert q == 0.5 and e == q and list(r) == [0, 1, 2] and k == {'a'}\nassert list(d) == [1]\n",
    ),
    "returns_an_object": (
        "class Box:\n    def __init__(self, value):\n        self.value = value\n"
        "def f():\n    return Box([1])\n",
        "box = f()\nassert box.value == [1] and type(box).__name__ == 'Box'\nassert box.value == [2]\n",
    ),
    "returns_an_object_without_a_dict": (
        "import re\nclass Slotted:\n    __slots__ = ('x',)\n    def __init__(self):\n        self.x = 1\n"
        "def f(text):\n    return re.search('b', text), Slotted()\n",
        "match, slotted = f('abc')\nassert slotted.x == 1\nassert match == ('b', 1, 2)\n",
    ),
    "returns_a_function": (
        "def f(x):\n    return lambda y: x + y\n",
        "assert f(2)(3) == 5\nassert f(2)(3) == 6\n",
    ),
    "takes_a_builtin_type": (
        "def only(xs, kind):\n    return [x for x in xs if isinstance(x, kind)]\n",
        "assert only([1, 'a', 2.5], int) == [1]\nassert only([1], str) == [1]\n",
    ),
    "raises_what_the_tests_catch": (
        "class Empty(ValueError):\n    pass\ndef f(xs):\n    if not xs:\n        raise Empty('no items')\n"
        "    return xs[0]\n",
        "try:\n    f([])\nexcept ValueError as error:\n    assert str(error) == 'no items'\nelse:\n"
        "    assert False\nf([])\n",
    ),
    "humaneval_check": (
        "def f(x):\n    return x + undefined\n",
        "def check(candidate):\n    assert candidate(1) == 2\n\ncheck(f)\n",
    ),
    "uses_the_programs_imports_and_constants": (
        "import math\nLIMIT = 10\ndef f(x):\n    return x * 1.5\n",
        "assert math.isclose(f(2), 3.0) and LIMIT == 10\nassert math.isclose(f(2), 3.1)\n",
    ),
}


@pytest.mark.parametrize("case", list(SAME_EITHER_WAY))
def test_ordinary_programs_get_the_same_result_and_feedback_either_way(
    dispatcher: Dispatcher, case: str
) -> None:
    in_process, separate = dispatcher.both(*SAME_EITHER_WAY[case])
    assert separate == in_process


def test_the_cases_cover_every_outcome(dispatcher: Dispatcher) -> None:
    outcomes = {dispatcher.run(*SAME_EITHER_WAY[case])["status"] for case in SAME_EITHER_WAY}
    assert outcomes == {"passed", "failed", "timeout"}


def test_a_value_that_cannot_cross_is_the_programs_failure_and_says_so(dispatcher: Dispatcher) -> None:
    source = (
        "def f():\n    nested = []\n    for _ in range(300):\n        nested = [nested]\n    return nested\n"
    )
    in_process, separate = dispatcher.both(source, "assert f() is not None\n")
    assert in_process["status"] == "passed"
    assert (separate["status"], separate["exception_type"]) == ("failed", "UnsendableValue")
    assert separate["exception_message"] == (
        "the program's value cannot be sent to its tests: it is nested more than 200 deep"
    )
    # Where the test called it, as for any exception the program raises.
    assert separate["frames"] == [[7, "<module>", "assert f() is not None", 1]]


def test_tests_that_pass_the_program_what_cannot_cross_are_a_sandbox_error(dispatcher: Dispatcher) -> None:
    result = dispatcher.run("def apply(f, x):\n    return f(x)\n", "assert apply(lambda x: x + 1, 1) == 2\n")
    assert (result["status"], result["exception_type"]) == ("sandbox_error", "SandboxError")
    assert "needs isolation: in_process" in result["exception_message"]


def test_a_program_that_writes_on_the_tests_channel_fails(dispatcher: Dispatcher) -> None:
    source = ADD + "import os\nos.write(4, b'not json\\n')\n"
    result = dispatcher.run(source, "assert add(1, 2) == 3\n")
    assert (result["status"], result["exception_type"]) == ("failed", "HarnessError")


def test_a_program_that_swallows_its_tests_in_a_string_does_not_pass(dispatcher: Dispatcher) -> None:
    # Joined, the tests become the body of a string and never run; apart, the program alone does not compile.
    source = ADD + "x = '''\n"
    in_process, separate = dispatcher.both(source, "assert add(1, 2) == 4\ny = '''\n")
    assert in_process["status"] == "passed"
    assert (separate["status"], separate["exception_type"]) == ("failed", "SyntaxError")


def test_the_tests_never_run_the_programs_code(dispatcher: Dispatcher) -> None:
    # A module the program writes where it runs, named as one the tests import.
    source = ADD + "open('json.py', 'w').write('raise SystemExit(0)')\nimport builtins\nbuiltins.abs = None\n"
    result = dispatcher.run(source, "import json\nassert json.dumps([abs(-add(1, 2))]) == '[3]'\n")
    assert result["status"] == "passed"


def test_a_program_that_breaks_the_harness_in_its_own_process_fails(dispatcher: Dispatcher) -> None:
    result = dispatcher.run(ADD + "import builtins\nbuiltins.len = None\n", "assert add(1, 2) == 3\n")
    assert (result["status"], result["exception_type"]) == ("failed", "HarnessError")


def test_the_tests_take_a_builtins_name_from_the_program_only_where_the_problem_gives_it() -> None:
    problem = Problem(
        task_id="MBPP/126-like",
        dataset="mbpp",
        split="test",
        prompt='"""\nWrite a python function to find the sum of common divisors of two given numbers.\n"""',
        test_code="assert sum(10, 15) == 6\nassert abs(-1) == 1\n",
        reference_solution="def sum(a, b):\n    return 6\n",
    )
    assert builtins_defined(problem) == ("sum",)
    program = program_for(problem, "\ndef sum(a, b):\n    return 6\nabs = lambda value: 0\n")
    assert program.own_builtins == ("sum",)


def test_a_program_defines_for_its_tests_only_the_builtins_the_problem_gives_it(
    dispatcher: Dispatcher,
) -> None:
    source = "def sum(a, b):\n    return 6\nabs = lambda value: -1\n"
    tests = "assert sum(10, 15) == 6\nassert abs(-1) == 1\n"
    assert dispatcher.run(source, tests, own_builtins=("sum",))["status"] == "passed"
    # Without it, the tests' sum is the builtin one, and sum(10, 15) is an error.
    result = dispatcher.run(source, tests)
    assert (result["status"], result["exception_type"]) == ("failed", "TypeError")
