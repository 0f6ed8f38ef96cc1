"""Starting Snakemake in a folder that a killed Snakemake left locked.

Snakemake locks its working folder while it runs and unlocks it when it ends. A Snakemake killed with
SIGKILL (or a machine that went down) leaves the lock behind, and the next run stops with "the folder
is locked". `leti snakemake ARGS` (what `make run` runs) tells the two cases apart before it becomes
Snakemake (exec, the same process): it records which process on which host runs in the folder, and a
lock whose recorded process is gone on this host is stale and removed with `snakemake --unlock`. A lock
it cannot judge (another host's, or a Snakemake started by hand) it leaves alone and names the command.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from leti.errors import LetiError

STATE_DIR = Path(".snakemake")
LOCKS_DIR = STATE_DIR / "locks"
OWNER_FILE = STATE_DIR / "leti-owner.json"


class FolderLocked(LetiError):
    """A lock that a live Snakemake holds, or one this process cannot judge."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: float

    def alive(self) -> bool:
        """Is the recorded process still the one that started then? (A pid can be reused.)"""
        try:
            process = psutil.Process(self.pid)
            same = abs(process.create_time() - self.started) < 1.0
            return same and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def locked(folder: Path) -> bool:
    return any((folder / LOCKS_DIR).glob("*.lock"))


def recorded_owner(folder: Path) -> Owner | None:
    try:
        return Owner(**json.loads((folder / OWNER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def record_owner(folder: Path) -> None:
    """This process as the folder's Snakemake: after the exec it is one."""
    me = psutil.Process()
    (folder / STATE_DIR).mkdir(exist_ok=True)
    owner = {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}
    tmp = folder / OWNER_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(owner))
    tmp.replace(folder / OWNER_FILE)


def snakemakes_in(folder: Path) -> list[int]:
    """Live Snakemake processes of this host working in `folder`, this one excepted."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline, cwd = process.info["cmdline"] or [], process.info["cwd"]
        runs_snakemake = any(Path(part).name == "snakemake" for part in cmdline[:2])
        if runs_snakemake and cwd and Path(cwd) == folder and process.info["pid"] != os.getpid():
            found.append(process.info["pid"])
    return found


def stale_lock(folder: Path, unlock: str) -> bool:
    """True when `folder` is locked by a Snakemake that is gone; raises FolderLocked when a live one
    holds it, or when whose lock it is cannot be told from here (naming `unlock`, the command)."""
    if not locked(folder):
        return False
    live = snakemakes_in(folder)
    if live:
        raise FolderLocked(
            f"{folder}: Snakemake {', '.join(map(str, live))} is running here; wait for it or stop it"
        )
    owner = recorded_owner(folder)
    if owner is None or owner.host != socket.gethostname():
        where = "a Snakemake started by hand" if owner is None else f"host {owner.host}"
        raise FolderLocked(
            f"{folder} is locked by {where}; if no Snakemake runs there any more, run: {unlock}"
        )
    if owner.alive():
        raise FolderLocked(f"{folder}: Snakemake {owner.pid} is running here; wait for it or stop it")
    return True


def run_snakemake(arguments: Sequence[str], folder: Path | None = None) -> None:
    """Remove a stale lock, then become `snakemake ARGUMENTS` in this process."""
    folder = (folder or Path.cwd()).resolve()
    executable = str(Path(sys.executable).with_name("snakemake"))
    unlock = [executable, *arguments, "--unlock"]
    if stale_lock(folder, shlex.join(unlock)):
        print(f"{folder}: removing the lock of a Snakemake that is gone", file=sys.stderr)
        subprocess.run(unlock, cwd=folder, check=True, capture_output=True)
    record_owner(folder)
    os.execv(executable, [executable, *arguments])
