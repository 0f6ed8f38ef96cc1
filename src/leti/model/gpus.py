"""How many CUDA GPUs this process may use, as Snakemake needs to know when it plans a job's
resources: cheap on a machine without an NVIDIA driver, where it never imports torch (seconds, on
every parse of the Snakefile, which every cluster job repeats)."""

from __future__ import annotations

import shutil
from pathlib import Path


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
