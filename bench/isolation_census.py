"""Every shipped gold solution run both ways: its tests in the program's own process
(`in_process`) and in a process of their own (`separate`). Prints, per task set, how many get
the same verdict and the same feedback text, each problem where they differ, and whether
src/leti/tasks/in_process.json lists every such problem (those run in_process).

    .venv/bin/python bench/isolation_census.py [--backend docker|local] [--json FILE]

MBPP (all four splits, 974), HumanEval (164) and GENEVA (every split) from the local copies
($LETI_MBPP_PATH, $LETI_GENEVA_DIR, or ../shared/data beside the checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from leti.config import MBPP_SPLITS, ExecuteConfig
from leti.execute import program_for
from leti.records import Problem
from leti.sandbox import Program, RunResult, open_pool, run_programs
from leti.sandbox.feedback import feedback_text
from leti.sandbox.image import build_image
from leti.tasks.sources import GENEVA_SPLIT_FILES, in_process_task_ids, load_task_set

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def local_path(variable: str, fallback: Path) -> Path:
    path = Path(os.environ.get(variable) or fallback)
    if not path.exists():
        sys.exit(f"bench/isolation_census.py needs {fallback.name}: set {variable}")
    return path


def task_sets() -> dict[str, list[Problem]]:
    mbpp = local_path("LETI_MBPP_PATH", SHARED / "mbpp" / "mbpp.jsonl")
    geneva = local_path("LETI_GENEVA_DIR", SHARED / "geneva")
    sets = {f"mbpp/{split}": load_task_set("mbpp", split, mbpp) for split in MBPP_SPLITS}
    sets["humaneval/test"] = load_task_set("humaneval", "test", None)
    for split in GENEVA_SPLIT_FILES:
        sets[f"geneva/{split}"] = load_task_set("geneva", split, geneva)
    return sets


def gold_completion(problem: Problem) -> str:
    """The gold solution as a completion of the prompt (MBPP's prompt is a docstring, GENEVA's ends
    inside the event's call, HumanEval's inside the function)."""
    assert problem.reference_solution is not None, problem.task_id
    separator = "" if problem.prompt.endswith("\n") else "\n"
    return separator + problem.reference_solution


def outcome(result: RunResult) -> tuple[str, str]:
    return result.status.value, feedback_text(result, 2048)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["docker", "local"], default="docker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every difference here")
    args = parser.parse_args()
    settings = ExecuteConfig(backend=args.backend)
    image = build_image(settings, REPO / "envs" / "sandbox.Dockerfile", log=lambda line: None)
    differences = []
    print(
        f"{'task set':<18} {'problems':>8} {'same':>6} {'differ':>6} {'in_process s':>12} {'separate s':>10}"
    )
    with open_pool(settings, args.workers, image) as pool:
        for name, problems in task_sets().items():
            joined = [Program(problem.program(gold_completion(problem))) for problem in problems]
            split = [
                program_for(problem.model_copy(update={"isolation": "separate"}), gold_completion(problem))
                for problem in problems
            ]
            started = time.monotonic()
            before = run_programs(pool, joined)
            middle = time.monotonic()
            after = run_programs(pool, split)
            ended = time.monotonic()
            differing = [
                {
                    "task_set": name,
                    "task_id": problem.task_id,
                    "in_process": outcome(old),
                    "separate": outcome(new),
                }
                for problem, old, new in zip(problems, before, after, strict=True)
                if outcome(old) != outcome(new)
            ]
            differences += differing
            print(
                f"{name:<18} {len(problems):>8} {len(problems) - len(differing):>6} {len(differing):>6} "
                f"{middle - started:>12.1f} {ended - middle:>10.1f}"
            )
    listed = in_process_task_ids()
    uncovered = sorted({difference["task_id"] for difference in differences} - listed)
    print(
        f"\nsrc/leti/tasks/in_process.json lists {len(listed)} problems; differences it does not list: "
        f"{', '.join(uncovered) or 'none'}"
    )
    for difference in differences:
        print(f"\n{difference['task_set']} {difference['task_id']}")
        print(f"  in_process: {difference['in_process'][0]}: {difference['in_process'][1][-300:]}")
        print(f"  separate:   {difference['separate'][0]}: {difference['separate'][1][-300:]}")
    if args.json is not None:
        args.json.write_text(json.dumps(differences, indent=1))


if __name__ == "__main__":
    main()
