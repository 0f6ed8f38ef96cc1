"""Atomic artifact writes and typed JSONL reading.

Every file a stage writes goes through this module, so that a job killed at any
moment leaves either the previous file or nothing at its output path, never a
truncated one: Snakemake would otherwise treat a half-written file as done.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ValidationError

from leti.errors import LetiError

if TYPE_CHECKING:
    import pandas as pd

RecordT = TypeVar("RecordT", bound=BaseModel)


class ArtifactError(LetiError):
    """An artifact file that does not hold what its type promises; the message names file and line."""


def temporary_prefix(target: Path, pid: int | None = None) -> str:
    """Temporaries name their writer, so that a later writer can tell a dead one's leftovers."""
    return f".{target.name}.{socket.gethostname()}-{os.getpid() if pid is None else pid}."


def remove_stale_temporaries(target: Path) -> None:
    """Delete the temporaries of `target` whose writer, on this host, is gone. A SIGKILLed job
    never reaches its cleanup, and a half-written model folder is gigabytes. Writers on other
    hosts of a shared filesystem are left alone: their liveness cannot be checked from here."""
    import psutil

    prefix = temporary_prefix(target, pid=0).removesuffix("0.")
    for leftover in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = leftover.name.removeprefix(prefix).split(".", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it is renamed onto `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(_default_mode(0o666))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Like `atomic_path` for a directory: fill the yielded directory; it replaces `path` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(_default_mode(0o777))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, read in chunks: model weights do not fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _default_mode(full: int) -> int:
    """The mode a plain open() would give: mkstemp and mkdtemp create private (0600/0700) entries."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def _write_lines(tmp: Path, lines: Iterable[str]) -> int:
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line)
            handle.write("\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    return count


def write_jsonl(path: str | os.PathLike[str], records: Iterable[BaseModel]) -> int:
    """Write records one JSON object per line, atomically. Returns the number written."""
    with atomic_path(path) as tmp:
        return _write_lines(tmp, (record.model_dump_json() for record in records))


def iter_jsonl(path: str | os.PathLike[str], record_type: type[RecordT]) -> Iterator[RecordT]:
    """Yield each line of a JSONL file parsed as `record_type`; blank lines are skipped.

    Raises ArtifactError naming `path:line` for the first line that is not valid JSON
    or does not match the record type.
    """
    for _, record in iter_numbered_jsonl(path, record_type):
        yield record


def iter_numbered_jsonl(
    path: str | os.PathLike[str], record_type: type[RecordT]
) -> Iterator[tuple[int, RecordT]]:
    """Like `iter_jsonl`, with each record's line number, for checks that name the line."""
    source = Path(path)
    try:
        handle = source.open(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{source}: no such file") from None
    with handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, record_type.model_validate_json(line)
            except ValidationError as error:
                raise ArtifactError(
                    f"{source}:{line_number}: not a valid {record_type.__name__} record: "
                    f"{_describe_validation_error(error)}"
                ) from None


def read_jsonl(path: str | os.PathLike[str], record_type: type[RecordT]) -> list[RecordT]:
    return list(iter_jsonl(path, record_type))


def write_json(path: str | os.PathLike[str], record: BaseModel) -> None:
    """Write a single record as an indented JSON document, atomically."""
    with atomic_path(path) as tmp:
        _write_lines(tmp, [record.model_dump_json(indent=2)])


def write_csv(path: str | os.PathLike[str], table: pd.DataFrame) -> None:
    """Write a table as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def read_json(path: str | os.PathLike[str], record_type: type[RecordT]) -> RecordT:
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{source}: no such file") from None
    try:
        return record_type.model_validate_json(text)
    except ValidationError as error:
        raise ArtifactError(
            f"{source}: not a valid {record_type.__name__} document: {_describe_validation_error(error)}"
        ) from None


def _describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"])
        parts.append(f"{location}: {item['msg']}" if location else item["msg"])
    return "; ".join(parts)
