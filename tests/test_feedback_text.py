"""The LETI feedback text: pinned for the canonical failures, run for real in both backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from leti.config import ExecuteConfig
from leti.records import ExecutionStatus, SandboxImage
from leti.sandbox import SandboxPool, open_pool
from leti.sandbox.base import RunResult
from leti.sandbox.feedback import feedback_text, sanitise, traceback_text, truncate_middle

REPO = Path(__file__).resolve().parents[1]

NAME_ERROR = """\
def total(numbers):
    result = 0
    for n in numbers:
        result += n
    return reslt


assert total([1, 2, 3]) == 6
"""
NAME_ERROR_FEEDBACK = """\
Traceback (most recent call last):
  File "program.py", line 8, in <module>
    assert total([1, 2, 3]) == 6
  File "program.py", line 5, in total
    return reslt
NameError: name 'reslt' is not defined. Did you mean: 'result'?"""

ASSERTION = """\
def square(x):
    return x * 2


assert square(2) == 4
assert square(3) == 9
"""
ASSERTION_FEEDBACK = """\
Traceback (most recent call last):
  File "program.py", line 6, in <module>
    assert square(3) == 9
AssertionError"""

SYNTAX_ERROR = """\
def add(a, b)
    return a + b


assert add(1, 2) == 3
"""
SYNTAX_ERROR_FEEDBACK = """\
  File "program.py", line 1
    def add(a, b)
SyntaxError: expected ':'"""

INFINITE_LOOP = """\
def search(items):
    while True:
        pass


assert search([1]) == 1
"""
TIMEOUT_FEEDBACK = "Timeout: the program did not finish within 1 second"

RECURSION = """\
def factorial(n):
    return n * factorial(n - 1)


assert factorial(5) == 120
"""
# What `python3 program.py` prints, without the carets: the program gets a script's stack.
RECURSION_FEEDBACK = """\
Traceback (most recent call last):
  File "program.py", line 5, in <module>
    assert factorial(5) == 120
  File "program.py", line 2, in factorial
    return n * factorial(n - 1)
  File "program.py", line 2, in factorial
    return n * factorial(n - 1)
  File "program.py", line 2, in factorial
    return n * factorial(n - 1)
  [Previous line repeated 996 more times]
RecursionError: maximum recursion depth exceeded"""

CANONICAL = {
    "name_error": (NAME_ERROR, ExecutionStatus.failed, "NameError", NAME_ERROR_FEEDBACK),
    "assertion": (ASSERTION, ExecutionStatus.failed, "AssertionError", ASSERTION_FEEDBACK),
    "syntax_error": (SYNTAX_ERROR, ExecutionStatus.failed, "SyntaxError", SYNTAX_ERROR_FEEDBACK),
    "timeout": (INFINITE_LOOP, ExecutionStatus.timeout, "Timeout", TIMEOUT_FEEDBACK),
    "recursion": (RECURSION, ExecutionStatus.failed, "RecursionError", RECURSION_FEEDBACK),
}

SETTINGS = {"timeout_s": 1.0}


@pytest.fixture(scope="module", params=["docker", "local"])
def pool(request: pytest.FixtureRequest, sandbox_image: SandboxImage) -> Iterator[SandboxPool]:
    settings = ExecuteConfig(backend=request.param, **SETTINGS)
    with open_pool(settings, 1, sandbox_image) as opened:
        yield opened


@pytest.mark.parametrize("case", list(CANONICAL))
def test_canonical_failures_give_the_pinned_feedback(pool: SandboxPool, case: str) -> None:
    program, status, exception_type, expected = CANONICAL[case]
    result = pool.run(program)
    assert result.status == status
    assert result.exception_type == exception_type
    assert feedback_text(result, 2048) == expected


def test_a_pass_has_no_feedback(pool: SandboxPool) -> None:
    result = pool.run("def add(a, b):\n    return a + b\n\n\nassert add(1, 2) == 3\n")
    assert result.status == ExecutionStatus.passed
    assert feedback_text(result, 2048) == ""


def test_library_frames_are_left_out_and_the_exception_kept(pool: SandboxPool) -> None:
    result = pool.run("import json\n\n\ndef parse(text):\n    return json.loads(text)\n\n\nparse('{')\n")
    assert feedback_text(result, 2048) == (
        "Traceback (most recent call last):\n"
        '  File "program.py", line 8, in <module>\n'
        "    parse('{')\n"
        '  File "program.py", line 5, in parse\n'
        "    return json.loads(text)\n"
        "json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    )


def test_no_path_of_the_machine_reaches_the_feedback(pool: SandboxPool) -> None:
    result = pool.run("import os\nopen(os.path.join(os.getcwd(), 'missing.txt'))\n")
    text = feedback_text(result, 2048)
    assert text.endswith("FileNotFoundError: [Errno 2] No such file or directory: 'missing.txt'")
    assert "/tmp" not in text


def test_long_feedback_keeps_head_and_tail(pool: SandboxPool) -> None:
    result = pool.run("def fail():\n    raise ValueError('x' * 5000 + ' the end')\n\n\nfail()\n")
    text = feedback_text(result, 300)
    assert len(text) <= 300
    assert text.startswith('Traceback (most recent call last):\n  File "program.py", line 5, in <module>\n')
    assert text.endswith("x the end")
    assert "characters omitted) ..." in text


def test_unsafe_local_hides_its_host_temporary_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("leti.sandbox.local.shutil.which", lambda name: None)
    settings = ExecuteConfig(backend="local", allow_unsafe_local=True, **SETTINGS)
    with open_pool(settings, 1) as pool:
        result = pool.run("import os\nprint(os.getcwd())\nopen(os.path.join(os.getcwd(), 'missing.txt'))\n")
    assert result.scratch.startswith("/tmp/leti-local-sandbox-")
    assert feedback_text(result, 2048).endswith("No such file or directory: 'missing.txt'")
    assert sanitise(result.stdout, result.scratch) == ".\n"


# --- the text functions alone


def test_traceback_text_summarises_repeated_frames_as_python_does() -> None:
    frames = [(3, "<module>", "f(0)", 1), (2, "f", "g(n)", 2), (5, "g", "return f(n)", 4)]
    assert traceback_text(frames, ["RecursionError: too deep\n"]) == (
        "Traceback (most recent call last):\n"
        '  File "program.py", line 3, in <module>\n    f(0)\n'
        '  File "program.py", line 2, in f\n    g(n)\n'
        '  File "program.py", line 2, in f\n    g(n)\n'
        '  File "program.py", line 5, in g\n    return f(n)\n'
        '  File "program.py", line 5, in g\n    return f(n)\n'
        '  File "program.py", line 5, in g\n    return f(n)\n'
        "  [Previous line repeated 1 more time]\n"
        "RecursionError: too deep"
    )


def test_truncation_cuts_whole_lines_in_the_middle() -> None:
    text = "\n".join(f"line {number:02d}" for number in range(40))
    cut = truncate_middle(text, 100)
    assert cut == (
        "line 00\nline 01\nline 02\nline 03\n"
        "... (255 characters omitted) ...\n"
        "line 36\nline 37\nline 38\nline 39"
    )
    assert len(cut) <= 100


def test_truncation_accounts_for_every_character() -> None:
    text = "\n".join("y" * (number % 13) for number in range(500))
    for limit in (60, 61, 200, 999):
        cut = truncate_middle(text, limit)
        assert len(cut) <= limit
        head, marker, tail = (
            cut.split("\n... (")[0],
            cut.split("... (")[1].split(" ")[0],
            cut.split(") ...\n")[1],
        )
        assert len(head) + 1 + int(marker) + 1 + len(tail) == len(text)


def test_truncation_of_a_single_long_line_and_of_short_texts() -> None:
    text = "a" * 50 + "b" * 50
    assert truncate_middle(text, 100) == text
    cut = truncate_middle(text, 60)
    assert cut == "a" * 13 + "\n... (74 characters omitted) ...\n" + "b" * 13
    assert truncate_middle(text, 10) == "b" * 10


def test_sanitise_shows_the_working_directory_as_dot() -> None:
    assert (
        sanitise("No such file: '/tmp/run/data.txt' in /tmp/run", "/tmp/run")
        == "No such file: 'data.txt' in ."
    )


def test_passes_and_sandbox_errors_carry_no_feedback() -> None:
    for status in (ExecutionStatus.passed, ExecutionStatus.sandbox_error):
        result = RunResult(
            status=status, exception_type="SandboxError", exception_message="the sandbox broke"
        )
        assert feedback_text(result, 100) == ""
    failed = RunResult(status=ExecutionStatus.failed, exception_type="EarlyExit", exception_message="exited")
    assert feedback_text(failed, 100) == "EarlyExit: exited"
