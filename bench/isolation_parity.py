"""A finished run's samples executed again, with each problem's isolation as the task files give it,
against the executions the run wrote: how many keep their verdict and their feedback, and which do not.

    .venv/bin/python bench/isolation_parity.py RUN_FOLDER [--backend docker|local]

RUN_FOLDER is a run's working directory (results/, resources/tasks/). Each
results/**/samples.jsonl is run again with its task set (the tasks are prepared afresh from the
run's task files, so problems listed in src/leti/tasks/in_process.json run in the program's process).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from leti.config import ExecuteConfig
from leti.execute import execute_samples, programs_for
from leti.io import read_jsonl
from leti.records import Execution, Problem, Sample
from leti.sandbox import open_pool
from leti.sandbox.image import build_image
from leti.tasks.sources import isolation_of

REPO = Path(__file__).resolve().parents[1]


def task_file(run: Path, samples: Path) -> Path:
    """results/{policy}/{purpose}/{dataset}/{split}/samples.jsonl -> resources/tasks/{dataset}/{split}.jsonl"""
    dataset, split = samples.parent.parent.name, samples.parent.name
    return run / "resources" / "tasks" / dataset / f"{split}.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--backend", choices=["docker", "local"], default="docker")
    args = parser.parse_args()
    settings = ExecuteConfig(backend=args.backend)
    image = build_image(settings, REPO / "envs" / "sandbox.Dockerfile", log=lambda line: None)
    totals: Counter[str] = Counter()
    with open_pool(settings, 2, image) as pool:
        for samples_path in sorted((args.run / "results").rglob("samples.jsonl")):
            if "shards" in samples_path.parts:
                continue
            executions_path = samples_path.with_name("executions.jsonl")
            if not executions_path.exists():
                continue
            problems = [
                problem.model_copy(update={"isolation": isolation_of(problem.task_id)})
                for problem in read_jsonl(task_file(args.run, samples_path), Problem)
            ]
            samples = read_jsonl(samples_path, Sample)
            before = read_jsonl(executions_path, Execution)
            after = execute_samples(
                pool, samples, programs_for(problems, samples, str(samples_path)), settings
            )
            differing = [
                (old, new)
                for old, new in zip(before, after, strict=True)
                if (old.status, old.feedback) != (new.status, new.feedback)
            ]
            totals["samples"] += len(samples)
            totals["differ"] += len(differing)
            totals["separate"] += sum(new.isolation == "separate" for new in after)
            print(f"{samples_path.relative_to(args.run)}: {len(samples)} samples, {len(differing)} differ")
            for old, new in differing:
                print(f"  {old.task_id} #{old.sample_index}: {old.status.value} -> {new.status.value}")
                print(f"    before: {old.feedback[-300:]!r}\n    after:  {new.feedback[-300:]!r}")
    print(
        f"\n{totals['samples']} samples, {totals['separate']} with the tests apart; "
        f"{totals['differ']} changed verdict or feedback"
    )


if __name__ == "__main__":
    main()
