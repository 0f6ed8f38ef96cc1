"""GPUs and jobs: how many CUDA GPUs this process may use, as Snakemake needs to know when it plans a
job's resources (cheap on a machine without an NVIDIA driver, where it never imports torch: seconds,
on every parse of the Snakefile, which every cluster job repeats), and which of them a job takes
when no scheduler chose for it.

SLURM gives each job its GPUs in CUDA_VISIBLE_DEVICES. Snakemake on one machine only counts them
(`--resources gpu=N`): every job would see all GPUs and start on the first. So a job that finds no
CUDA_VISIBLE_DEVICES takes free GPUs itself, each by an exclusive lock on a file of its own that the
job holds until it ends (the kernel drops it then, even after a kill).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO


def visible_gpus() -> int:
    """The CUDA GPUs torch would see here (CUDA_VISIBLE_DEVICES respected); 0 without a driver."""
    if shutil.which("nvidia-smi") is None and not Path("/proc/driver/nvidia").exists():
        return 0
    import torch

    return torch.cuda.device_count()


# Arguments after which Snakemake runs jobs elsewhere, or takes its settings from a profile: the
# GPUs of this machine say nothing about theirs.
_REMOTE_OR_PROFILE = ("--executor", "-e", "--profile", "--workflow-profile")


def with_gpu_limit(arguments: list[str]) -> list[str]:
    """Snakemake's arguments with `--resources gpu=N` added for a local run on a machine with N GPUs.

    Snakemake leaves a resource that `--resources` does not name unlimited, so without it every
    generate, finetune and probe job would start at once on the one GPU they share.
    """
    named = {argument.split("=", 1)[0] for argument in arguments}
    if named & {"--resources", "--res", *_REMOTE_OR_PROFILE}:
        return arguments
    gpus = visible_gpus()
    return [*arguments, "--resources", f"gpu={gpus}"] if gpus else arguments


LOCK_FOLDER = Path(tempfile.gettempdir()) / "leti-gpus"
# The locks this process holds: closing a file would release its GPU.
_held: list[IO[str]] = []


def nvidia_gpus() -> int:
    """The GPUs the NVIDIA driver lists, counted without starting CUDA (which would fix its view of
    CUDA_VISIBLE_DEVICES before this module sets it)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def claim_gpus(count: int, poll_s: float = 5.0) -> list[int]:
    """Take `count` free GPUs of this machine for this process and make them the only ones CUDA shows
    it; nothing where a scheduler already chose (CUDA_VISIBLE_DEVICES set) or there is no GPU. Waits
    while fewer are free: Snakemake's `--resources gpu=N` keeps that short."""
    if count == 0 or "CUDA_VISIBLE_DEVICES" in os.environ:
        return []
    total = nvidia_gpus()
    if total == 0:
        return []
    if count > total:
        raise RuntimeError(f"this job needs {count} GPUs; this machine has {total}")
    LOCK_FOLDER.mkdir(exist_ok=True)
    waited = False
    while True:
        claimed = _try_claim(count, total)
        if claimed:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, claimed))
            return claimed
        if not waited:
            print(f"waiting for {count} free GPU(s) of {total} ({LOCK_FOLDER})", file=sys.stderr)
            waited = True
        time.sleep(poll_s)


def _try_claim(count: int, total: int) -> list[int]:
    """`count` GPU indices whose locks this process now holds, or [] having released any it took."""
    taken: list[tuple[int, IO[str]]] = []
    for index in range(total):
        handle = open(LOCK_FOLDER / f"{index}.lock", "a")  # noqa: SIM115 (held until the process ends)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        taken.append((index, handle))
        if len(taken) == count:
            _held.extend(handle for _, handle in taken)
            return [index for index, _ in taken]
    for _, handle in taken:
        handle.close()
    return []
