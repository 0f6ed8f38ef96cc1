"""Shards of the generate and execute stages: shard i of N is the i-th contiguous slice, in request
order, of a task set's (problem, sample_index) requests. Each shard is one job with its own files,
and gathering the shards in order gives the very file an unsharded job writes.

A sample depends only on its own seed (leti.generate), so which shard generates it changes nothing.
The shard names are Snakemake's scatter items, "3-of-16".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from leti.errors import LetiError
from leti.io import read_jsonl, write_jsonl
from leti.records import Execution, Problem, Sample

T = TypeVar("T")
# A request as the records of every stage name it: (task_id, sample_index).
RequestKey = tuple[str, int]
RecordKind = Literal["samples", "executions"]
RECORD_TYPES: dict[RecordKind, type[Sample] | type[Execution]] = {"samples": Sample, "executions": Execution}


class ShardError(LetiError):
    """A shard name that does not parse, or shard files that do not add up to the whole."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` (from 1) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ShardError(f"no shard {self.index} of {self.count}")

    @classmethod
    def parse(cls, name: str) -> Shard:
        """A shard from its name, "I-of-N"."""
        match = re.fullmatch(r"([0-9]+)-of-([0-9]+)", name)
        if match is None:
            raise ShardError(f"not a shard name: {name!r}; expected I-of-N, e.g. 3-of-16")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}-of-{self.count}"

    def of(self, items: Sequence[T]) -> list[T]:
        """This shard's contiguous slice of `items`; shard sizes differ by one at most."""
        total = len(items)
        return list(items[(self.index - 1) * total // self.count : self.index * total // self.count])


WHOLE = Shard(1, 1)


def request_keys(problems: Sequence[Problem], samples_per_problem: int) -> list[RequestKey]:
    """Every request of a task set in request order: by problem, then sample index (as generate
    orders its samples)."""
    return [(problem.task_id, index) for problem in problems for index in range(samples_per_problem)]


def gather_shards(
    shards: Sequence[Path], output: Path, kind: RecordKind, requests: Sequence[RequestKey]
) -> int:
    """Write the records of `shards` (shard 1 first) to `output`, one after another, after checking
    that shard i of N holds exactly the i-th slice of `requests`. Returns the number of records."""
    records: list[Sample | Execution] = []
    for number, path in enumerate(shards, start=1):
        shard = Shard(number, len(shards))
        found = read_jsonl(path, RECORD_TYPES[kind])
        keys = [(record.task_id, record.sample_index) for record in found]
        expected = shard.of(requests)
        if keys != expected:
            raise ShardError(
                f"{path}: {_describe(keys)}, but shard {shard.index} of {shard.count} of these "
                f"{len(requests)} requests is {_describe(expected)} (a shard of another run or shard count?)"
            )
        records += found
    return write_jsonl(output, records)


def _describe(keys: Sequence[RequestKey]) -> str:
    if not keys:
        return "no records"
    (first_task, first_index), (last_task, last_index) = keys[0], keys[-1]
    return f"{len(keys)} records, {first_task} #{first_index} to {last_task} #{last_index}"
