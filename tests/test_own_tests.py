"""The model's own test code: what counts, and what stripping it (a departure) leaves."""

from __future__ import annotations

import pytest

from leti.tasks.own_tests import has_own_tests, strip_own_tests

MBPP_PROMPT = '"""\nWrite a function to find the perimeter of a square.\nassert square_perimeter(10)==40\n"""'
SOLUTION = "\ndef square_perimeter(a):\n    return 4 * a\n"


def test_a_check_function_its_call_and_their_comment_lines_go() -> None:
    completion = (
        SOLUTION
        + "\n# Check function to verify the solution\ndef check():\n    assert square_perimeter(15)==45\n"
        + '    print("All tests passed!")\n\ncheck()'
    )
    assert has_own_tests(MBPP_PROMPT, completion)
    assert (
        strip_own_tests(MBPP_PROMPT, completion) == SOLUTION + "\n# Check function to verify the solution\n"
    )


@pytest.mark.parametrize(
    "tail",
    [
        "\ndef test_square_perimeter():\n    assert square_perimeter(1) == 4\n",
        "\nsquare_perimeter(3)\n",
        '\nif __name__ == "__main__":\n    print(square_perimeter(3))\n',
        "\nasync def test_it():\n    pass\n",
    ],
)
def test_test_functions_calls_and_main_blocks_are_own_tests(tail: str) -> None:
    assert strip_own_tests(MBPP_PROMPT, SOLUTION + tail) == SOLUTION


@pytest.mark.parametrize(
    "kept",
    [
        "\ndef check_prime(n):\n    return n > 1\n",  # a helper with parameters
        "\ndef check(n):\n    return n > 1\n",
        "\nimport math\nLIMIT = 10\nclass Box:\n    pass\n",
        '\n"""A string statement."""\n',
        "\ndef g():\n    assert True\n    return 1\n",  # asserts inside a helper are the helper's business
    ],
)
def test_helpers_imports_classes_and_assignments_stay(kept: str) -> None:
    completion = SOLUTION + kept
    assert not has_own_tests(MBPP_PROMPT, completion)
    assert strip_own_tests(MBPP_PROMPT, completion) == completion


def test_a_humaneval_body_keeps_its_lines_and_loses_its_test() -> None:
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    completion = "    return a + b\n\ndef test_add():\n    assert add(1, 2) == 4\ntest_add()\n"
    assert strip_own_tests(prompt, completion) == "    return a + b\n"


def test_a_statement_sharing_the_prompts_last_line_is_not_touched() -> None:
    assert strip_own_tests("x = 1", "; check()\n") == "; check()\n"


def test_a_program_that_does_not_parse_is_left_alone_but_its_own_tests_are_found() -> None:
    completion = SOLUTION + "\ndef check(:\n    pass\ncheck()\n"
    assert strip_own_tests(MBPP_PROMPT, completion) == completion
    assert has_own_tests(MBPP_PROMPT, completion)


@pytest.mark.parametrize(
    ("tail", "found"),
    [
        # The instruct model's usual ending: its check, a fence, then prose (a SyntaxError).
        (
            "\ndef check():\n    assert square_perimeter(15)==45\n\ncheck()\n```\n\nThis code defines `f`.",
            True,
        ),
        ("\ndef test_it():\n    assert square_perimeter(1) == 4\n```\nDone.", True),
        ('\nif __name__ == "__main__":\n    main(\n```', True),
        ("\ndef check(n):\n    return n\n```\nThis code checks (n) values.", False),
        ("\n```\n\nThis code defines a function `square_perimeter(a)` that returns 4 * a.", False),
        ("\n    x = check()\n```", False),
    ],
)
def test_own_tests_are_found_by_their_first_lines_when_nothing_parses(tail: str, found: bool) -> None:
    assert has_own_tests(MBPP_PROMPT, SOLUTION + tail) is found
