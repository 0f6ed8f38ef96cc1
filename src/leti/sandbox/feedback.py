"""LETI feedback text from a program's outcome.

The text is what the model is trained on after `<|lang_feedback|>`, so it shows only the
program's own frames (never the harness's), under one fixed file name, with line numbers
of the program as the model wrote it, and no path of the machine it ran on. Long texts
keep their head and tail: the tail holds the exception, the head where it started.
"""

from __future__ import annotations

from leti.records import ExecutionStatus
from leti.sandbox.base import RunResult
from leti.sandbox.dispatcher import PROGRAM_NAME

# Python's own tracebacks show a frame repeated this often before summarising the rest.
RECURSIVE_CUTOFF = 3


def feedback_text(result: RunResult, max_chars: int) -> str:
    """The feedback for one run; empty for a pass (LETI gives passing samples none) and for
    a sandbox error (it says nothing about the program)."""
    if result.status in (ExecutionStatus.passed, ExecutionStatus.sandbox_error):
        return ""
    if result.exception_lines:
        text = traceback_text(result.frames, result.exception_lines)
    elif result.exception_message:
        text = f"{result.exception_type}: {result.exception_message}"
    else:
        text = result.exception_type or ""
    return truncate_middle(sanitise(text, result.scratch), max_chars)


def traceback_text(frames: list[tuple[int, str, str, int]], exception_lines: list[str]) -> str:
    """A Python traceback of `frames` (line, function, source line, repeats) and the exception."""
    parts = []
    if frames:
        parts.append("Traceback (most recent call last):\n")
    for lineno, name, line, repeats in frames:
        entry = f'  File "{PROGRAM_NAME}", line {lineno}, in {name}\n'
        if line.strip():
            entry += f"    {line.strip()}\n"
        shown = min(repeats, RECURSIVE_CUTOFF)
        parts += [entry] * shown
        if repeats > shown:
            more = repeats - shown
            parts.append(f"  [Previous line repeated {more} more time{'s' if more > 1 else ''}]\n")
    parts += exception_lines
    return "".join(parts).rstrip("\n")


def sanitise(text: str, scratch: str) -> str:
    """Show the program's working directory as `.`: its real path is the machine's, not the program's."""
    if not scratch:
        return text
    return text.replace(scratch + "/", "").replace(scratch, ".")


def truncate_middle(text: str, max_chars: int) -> str:
    """`text` if it fits in `max_chars`, else its head and tail around a marker, cut at line
    ends where a line is shorter than the room."""
    if len(text) <= max_chars:
        return text
    room = max_chars - len(_marker(len(text))) - 2
    if room <= 0:
        return text[len(text) - max_chars :]
    head = text[: room // 2]
    tail = text[len(text) - (room - room // 2) :]
    # A newline at a cut is the original's, and still shown.
    shown = 0
    if "\n" in head:
        head = head[: head.rindex("\n")]
        shown += 1
    if "\n" in tail:
        tail = tail[tail.index("\n") + 1 :]
        shown += 1
    omitted = len(text) - len(head) - len(tail) - shown
    return f"{head}\n{_marker(omitted)}\n{tail}"


def _marker(omitted: int) -> str:
    return f"... ({omitted} characters omitted) ..."
