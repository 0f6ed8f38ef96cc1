from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The copy beside the checkout on the project's machines; others download the pinned file.
SHARED_MBPP = REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"
SHARED_GENEVA = REPO.parent / "shared" / "data" / "geneva"


@pytest.fixture(scope="session")
def mbpp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified MBPP file: $LETI_MBPP_PATH, the shared copy, or a fresh download."""
    from leti.tasks.sources import download_mbpp

    for candidate in (os.environ.get("LETI_MBPP_PATH"), SHARED_MBPP):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return download_mbpp(tmp_path_factory.mktemp("mbpp") / "mbpp.jsonl")


@pytest.fixture(scope="session")
def geneva_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified GENEVA folder (CC BY 3.0): $LETI_GENEVA_DIR, the shared copy, or a fresh download."""
    from leti.tasks.sources import download_geneva

    for candidate in (os.environ.get("LETI_GENEVA_DIR"), SHARED_GENEVA):
        if candidate and (Path(candidate) / "meta_data" / "event_ontology.json").is_file():
            return Path(candidate)
    return download_geneva(tmp_path_factory.mktemp("geneva"))


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the project's Snakefile with `workdir` as its working directory.

    The environment's bin folder goes first on PATH, as an activated venv would put it:
    the rules call `leti`.
    """
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    command = [shutil.which("snakemake", path=bin_dir) or "snakemake"]
    command += ["--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    # A guard against a hang, not a speed goal: the tiny DAG (with probe_generation, ~80 jobs) took
    # up to 955 s on 2 shared cores.
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)


@dataclass
class Job:
    rule: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def planned_jobs(workdir: Path, *args: str) -> list[Job]:
    """The jobs of a dry-run, parsed from what Snakemake prints for each."""
    result = run_snakemake(workdir, "--dry-run", "--cores", "2", *args)
    assert result.returncode == 0, result.stderr
    jobs: list[Job] = []
    for line in result.stdout.splitlines():
        if match := re.fullmatch(r"(?:local)?rule (\w+):", line):
            jobs.append(Job(match.group(1)))
        elif match := re.fullmatch(r"    (input|output): (.*)", line):
            files = match.group(2).split(", ")
            (jobs[-1].inputs if match.group(1) == "input" else jobs[-1].outputs).extend(files)
    assert jobs, result.stdout
    return jobs


@pytest.fixture(scope="session")
def sandbox_image():
    """The sandbox image, built once per session (a sub-second no-op when it is up to date)."""
    from leti.config import ExecuteConfig
    from leti.sandbox.image import build_image

    try:
        return build_image(ExecuteConfig(), REPO / "envs" / "sandbox.Dockerfile", log=lambda line: None)
    except Exception as error:
        pytest.fail(f"the sandbox tests need a running Docker engine and the sandbox image: {error}")


@pytest.fixture
def workdir(tmp_path: Path, mbpp_path: Path) -> Path:
    """An empty working directory holding a copy of the default config.yaml, pointed at local MBPP."""
    config = (REPO / "config.yaml").read_text()
    config = config.replace("mbpp_path: null", f"mbpp_path: {mbpp_path}")
    (tmp_path / "config.yaml").write_text(config)
    return tmp_path


def write_heldout_tasks(folder: Path, mbpp_path: Path) -> None:
    """data/mbpp-heldout.jsonl in `folder`, as the header of configs/heldout.yaml says to make it."""
    from leti.io import write_jsonl
    from leti.tasks.sources import mbpp_heldout

    write_jsonl(folder / "data" / "mbpp-heldout.jsonl", mbpp_heldout(mbpp_path, rollout_problems=64))


# A corpus for the tiny tokenizer: code, docstrings and the characters prompts start with.
TINY_CORPUS = '''"""
Write a function to add two numbers.
assert add(1, 2) == 3
"""
def add(a, b):
    return a + b

class Pair:
    def __init__(self, left, right):
        self.left = left
        self.right = right
print("<html>", "|", "good", "done")
Traceback (most recent call last):
  File "program.py", line 7, in <module>
AssertionError
'''


def write_tiny_qwen(
    folder: Path,
    corpus: str,
    *,
    tied: bool,
    max_positions: int = 256,
    extra_rows: int = 0,
    initializer_range: float = 0.3,
) -> Path:
    """A random 2-layer Qwen2 and a byte-level BPE tokenizer trained on `corpus`, as a plain HF folder.

    Byte-level, so it encodes any text. The default `initializer_range` makes the logits sharp, so
    that greedy choices are far from ties and training visibly lowers the loss. `extra_rows`:
    embedding rows beyond the tokenizer, as Qwen's checkpoints have.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([corpus] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer) + extra_rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        initializer_range=initializer_range,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_raw_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 with tied embeddings (`write_tiny_qwen`), no LETI tokens yet."""
    return write_tiny_qwen(tmp_path_factory.mktemp("tiny") / "raw", TINY_CORPUS, tied=True, max_positions=512)


@pytest.fixture(scope="session")
def tiny_model(tiny_raw_model: Path) -> Path:
    """The tiny model as `leti model prepare` leaves it: LETI tokens added, new rows initialised."""
    from leti.model.sources import prepare_model

    prepared = tiny_raw_model.parent / "prepared"
    prepare_model(str(tiny_raw_model), prepared)
    return prepared


def tiny_pipeline_config(mbpp_path: Path, model_source: Path, iterations: int = 2) -> dict:
    """The default config cut down to seconds: the tiny model, a few problems, short samples."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["iterations"] = iterations
    config["data"]["mbpp_path"] = str(mbpp_path)
    config["data"]["limits"] = {"mbpp/train": 3, "mbpp/test": 3, "humaneval/test": 2}
    config["model"] = {"source": str(model_source), "dtype": "float32"}
    sampling = {"n": 2, "max_new_tokens": 24, "batch_size": 4}
    config["generate"].update(sampling)
    config["evaluate"].update(sampling, k=[1, 2], temperature=0.8, top_p=0.95)
    config["execute"]["timeout_s"] = 5
    config["finetune"].update(batch_size=2, lora_r=4, lora_alpha=8, dtype="float32", learning_rate=1e-2)
    config["probe"] = {"tasks": ["mbpp/test"]}
    return config


@pytest.fixture
def tiny_workflow(tmp_path: Path, mbpp_path: Path, tiny_raw_model: Path) -> Path:
    """A working directory whose config.yaml runs the whole LETI DAG on the tiny model in about a minute."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_pipeline_config(mbpp_path, tiny_raw_model)))
    return tmp_path
