"""The execute stage: each sample's program, run with its problem's tests in the sandbox,
becomes one Execution record, written in the order of the samples."""

from __future__ import annotations

import ast
import builtins
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from leti.config import ConfigError, ExecuteConfig
from leti.io import ArtifactError, read_json, read_jsonl, write_jsonl
from leti.progress import StageProgress
from leti.records import Execution, Isolation, Problem, Sample, SandboxImage
from leti.sandbox import Program, RunResult, SandboxPool, open_pool, run_programs
from leti.sandbox.feedback import feedback_text, sanitise


def load_settings(text: str) -> ExecuteConfig:
    """The `execute` config section as the rules pass it (JSON)."""
    try:
        return ExecuteConfig.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
        )
        raise ConfigError(f"invalid execute settings: {problems}") from None


def to_execution(
    sample: Sample, result: RunResult, settings: ExecuteConfig, isolation: Isolation
) -> Execution:
    return Execution(
        task_id=sample.task_id,
        sample_index=sample.sample_index,
        status=result.status,
        exception_type=result.exception_type,
        exception_message=None
        if result.exception_message is None
        else sanitise(result.exception_message, result.scratch),
        feedback=feedback_text(result, settings.feedback_max_chars),
        stdout_tail=sanitise(result.stdout, result.scratch),
        stderr_tail=sanitise(result.stderr, result.scratch),
        duration_s=result.duration_s,
        isolation=isolation,
    )


def program_for(problem: Problem, completion: str, own_builtins: tuple[str, ...] | None = None) -> Program:
    """What one completion runs: the prompt and the completion, with the problem's tests apart from
    them (or, where the problem's tests need the program's own objects, after them).
    `own_builtins`: `builtins_defined(problem)`, when already known."""
    if problem.isolation == "in_process":
        return Program(problem.program(completion))
    if own_builtins is None:
        own_builtins = builtins_defined(problem)
    return Program(problem.prompt + completion, problem.test_code, own_builtins)


def builtins_defined(problem: Problem) -> tuple[str, ...]:
    """The builtins' names that the problem itself gives the program to define: its entry point, and
    the top-level names of its prompt and reference solution (MBPP/126's function is `sum`). The tests
    take no other such name from the program, so a program cannot define `abs` or `sorted` for them."""
    names = {problem.entry_point} if problem.entry_point else set()
    separator = "" if problem.prompt.endswith("\n") else "\n"
    try:
        tree = ast.parse(problem.prompt + separator + (problem.reference_solution or ""))
    except SyntaxError:
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return tuple(sorted(names & BUILTIN_NAMES))


BUILTIN_NAMES = frozenset(dir(builtins))


def programs_for(problems: Sequence[Problem], samples: Sequence[Sample], source: str) -> list[Program]:
    """What each sample runs (`program_for`)."""
    by_id = {problem.task_id: problem for problem in problems}
    own_builtins: dict[str, tuple[str, ...]] = {}
    programs = []
    for number, sample in enumerate(samples, start=1):
        problem = by_id.get(sample.task_id)
        if problem is None:
            raise ArtifactError(
                f"{source}: sample {number} is for task {sample.task_id!r}, not in the task set"
            )
        if problem.task_id not in own_builtins:
            own_builtins[problem.task_id] = builtins_defined(problem)
        programs.append(program_for(problem, sample.completion, own_builtins[problem.task_id]))
    return programs


def execute_samples(
    pool: SandboxPool,
    samples: Sequence[Sample],
    programs: Sequence[Program],
    settings: ExecuteConfig,
    console: Console | None = None,
) -> list[Execution]:
    """Run `programs[i]` for `samples[i]`, with a progress bar; records in the same order."""
    progress = StageProgress(
        TextColumn("executing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.0f} programs/s"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )
    started = time.monotonic()
    with progress:
        bar = progress.add_task("execute", total=len(programs), rate=0.0)

        def advance(_: RunResult) -> None:
            done = progress.tasks[0].completed + 1
            progress.update(bar, advance=1, rate=done / max(time.monotonic() - started, 1e-9))

        results = run_programs(pool, programs, on_result=advance)
    return [
        to_execution(sample, result, settings, "in_process" if program.tests is None else "separate")
        for sample, program, result in zip(samples, programs, results, strict=True)
    ]


def run_stage(
    tasks: Path,
    samples: Path,
    output: Path,
    settings: ExecuteConfig,
    threads: int,
    sandbox: Path | None,
    console: Console | None = None,
    sandbox_archive: Path | None = None,
) -> Counter[str]:
    """`leti execute`: samples.jsonl -> executions.jsonl. Returns the count of each status.
    `sandbox_archive`: where to load the image from on a node that lacks it."""
    problems = read_jsonl(tasks, Problem)
    sample_list = read_jsonl(samples, Sample)
    programs = programs_for(problems, sample_list, str(samples))
    image = read_json(sandbox, SandboxImage) if sandbox is not None else None
    executions: list[Execution] = []
    if sample_list:
        # More sandboxes than programs would only cost start-up time.
        size = settings.pool_size or min(threads, len(sample_list))
        with open_pool(settings, size, image, sandbox_archive) as pool:
            executions = execute_samples(pool, sample_list, programs, settings, console)
    write_jsonl(output, executions)
    return Counter(execution.status.value for execution in executions)
