"""The model's own test code in a completion: finding it, and (a departure from the reference,
`data.strip_own_tests`) removing it before the program runs.

Instruct models often follow a solution with a self-check such as

    def check():
        assert square_perimeter(15) == 45
    check()

with invented expected values, so a correct function can fail on its own test. The reference's
stop sequences (`"\\nassert"`, `"\\nprint"`, `"\\nif"` ...) cut top-level asserts but not these.
Own test code is, at the top level of the completion: a bare expression statement (a call such as
`check()`; a string literal is kept), a function without parameters named `check` or `test...`,
and an `if __name__ == "__main__":` block. Everything else (imports, helpers, classes,
assignments) stays.

A program that does not parse (prose after a Markdown fence, a cut at max_new_tokens) is never
stripped, but `has_own_tests` still finds its own tests by their first lines, so that a diagnosis
counts them where they are most common.
"""

from __future__ import annotations

import ast
import re

# The first line of an own test statement, at the top level.
_OWN_TEST_START = re.compile(
    r"""(async\s+)?def\s+(check|test\w*)\s*\(\s*\)   # a parameterless check() or test...()
      | if\s+__name__\s*==\s*['"]__main__['"]         # the main guard
      | [A-Za-z_][\w.]*\(.*\)\s*(\#.*)?$                # a bare call such as check()
    """,
    re.VERBOSE,
)


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and "__name__" in ast.unparse(node.test)
        and "__main__" in ast.unparse(node.test)
    )


def _is_own_test(node: ast.stmt) -> bool:
    if _is_main_guard(node):
        return True
    if isinstance(node, ast.Expr):
        return not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str))
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        arguments = node.args
        takes_nothing = not (
            arguments.posonlyargs
            or arguments.args
            or arguments.kwonlyargs
            or arguments.vararg
            or arguments.kwarg
        )
        return takes_nothing and (node.name == "check" or node.name.startswith("test"))
    return False


def own_test_lines(prompt: str, completion: str) -> list[tuple[int, int]]:
    """The own test statements of `completion`, as (first, last) indices into `completion.split("\\n")`.

    Only statements that begin on a line of their own in the completion count; none when
    prompt + completion does not parse (the program fails with a SyntaxError either way)."""
    module = _parsed(prompt + completion)
    return [] if module is None else _own_test_spans(module, prompt)


def has_own_tests(prompt: str, completion: str) -> bool:
    """Own test statements in `completion`; in one that does not parse, a top-level line starting one."""
    module = _parsed(prompt + completion)
    if module is None:
        return any(_OWN_TEST_START.match(line) for line in completion.split("\n")[1:])
    return bool(_own_test_spans(module, prompt))


def _parsed(program: str) -> ast.Module | None:
    try:
        return ast.parse(program)
    except (SyntaxError, ValueError):
        return None


def _own_test_spans(module: ast.Module, prompt: str) -> list[tuple[int, int]]:
    prompt_newlines = prompt.count("\n")
    spans = []
    for node in module.body:
        first = node.lineno - 1 - prompt_newlines
        if first >= 1 and _is_own_test(node):
            spans.append((first, (node.end_lineno or node.lineno) - 1 - prompt_newlines))
    return spans


def strip_own_tests(prompt: str, completion: str) -> str:
    """`completion` without its own test statements (unchanged when it has none or does not parse)."""
    spans = own_test_lines(prompt, completion)
    if not spans:
        return completion
    dropped = {index for first, last in spans for index in range(first, last + 1)}
    lines = completion.split("\n")
    return "\n".join(line for index, line in enumerate(lines) if index not in dropped).rstrip() + "\n"
