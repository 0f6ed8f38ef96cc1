from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The copy beside the checkout on the project's machines; others download the pinned file.
SHARED_MBPP = REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"


@pytest.fixture(scope="session")
def mbpp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified MBPP file: $LETI_MBPP_PATH, the shared copy, or a fresh download."""
    from leti.tasks import download_mbpp

    for candidate in (os.environ.get("LETI_MBPP_PATH"), SHARED_MBPP):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return download_mbpp(tmp_path_factory.mktemp("mbpp") / "mbpp.jsonl")


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the project's Snakefile with `workdir` as its working directory.

    The environment's bin folder goes first on PATH, as an activated venv would put it:
    the rules call `leti`.
    """
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    command = [shutil.which("snakemake", path=bin_dir) or "snakemake"]
    command += ["--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def workdir(tmp_path: Path, mbpp_path: Path) -> Path:
    """An empty working directory holding a copy of the default config.yaml, pointed at local MBPP."""
    config = (REPO / "config.yaml").read_text()
    config = config.replace("mbpp_path: null", f"mbpp_path: {mbpp_path}")
    (tmp_path / "config.yaml").write_text(config)
    return tmp_path
