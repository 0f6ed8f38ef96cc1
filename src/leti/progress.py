"""Progress bars that also show in a job's log file."""

from __future__ import annotations

from typing import Any

from rich.progress import Progress, TaskID


class StageProgress(Progress):
    """rich's Progress. Where stderr is no terminal (a Snakemake job's log), a live bar shows nothing
    until the job ends, so there the bar is also printed as a line each time another tenth is done."""

    def __init__(self, *columns: Any, **options: Any) -> None:
        super().__init__(*columns, **options)
        self._tenths_shown: dict[TaskID, int] = {}

    def update(self, task_id: TaskID, **changes: Any) -> None:
        super().update(task_id, **changes)
        if self.console.is_terminal or self.disable:
            return
        task = self._tasks[task_id]
        if not task.total or task.finished:
            return
        tenths = int(10 * task.completed / task.total)
        if tenths > self._tenths_shown.get(task_id, 0):
            self._tenths_shown[task_id] = tenths
            self.console.print(self.make_tasks_table([task]))
