"""Progress bars in a job's log file."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import MofNCompleteColumn, TextColumn

from leti.progress import StageProgress


def run_bar(console: Console, total: int) -> str:
    progress = StageProgress(TextColumn("work"), MofNCompleteColumn(), console=console)
    with progress:
        task = progress.add_task("work", total=total)
        for _ in range(total):
            progress.update(task, advance=1)
    return console.file.getvalue()


def test_a_log_file_gets_a_line_per_tenth_and_the_final_bar() -> None:
    shown = run_bar(Console(file=io.StringIO(), width=80), 25)
    lines = [" ".join(line.split()) for line in shown.splitlines() if line.strip()]
    # 25 steps: tenths 1..9 are first reached at 3, 5, 8, 10, 13, 15, 18, 20, 23; then the final frame.
    assert lines == [f"work {done}/25" for done in (3, 5, 8, 10, 13, 15, 18, 20, 23, 25)]


def test_a_terminal_gets_only_the_live_bar() -> None:
    console = Console(file=io.StringIO(), width=80, force_terminal=True)
    shown = run_bar(console, 25)
    assert " 3/25" not in shown and "25/25" in shown
