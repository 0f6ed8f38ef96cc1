"""What every job asks a cluster for, and where generation and fine-tuning run (leti.model.device)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_snakemake

import leti.config
import leti.model.gpus
from leti.config import GPU_RULES, RULES, Config, ResourcesConfig, load_config_file
from leti.model import device as devices
from leti.model.device import DeviceError, inference_dtype, resolve_device, training_dtype
from leti.model.gpus import claim_gpus, visible_gpus, with_gpu_limit

CPU_ONLY_RULES = {
    "download_mbpp",
    "download_geneva",
    "prepare_tasks",
    "build_sandbox",
    "execute",
    "build_feedback",
    "evaluate",
    "summarize",
}


def planned_resources(workdir: Path, *args: str) -> list[tuple[str, dict[str, str], int]]:
    """(rule, resources, threads) of every job the SLURM profile would submit (a dry run)."""
    result = run_snakemake(workdir, "--dry-run", "--profile", str(REPO / "profiles" / "slurm"), *args)
    assert result.returncode == 0, result.stderr
    jobs = []
    for line in result.stdout.splitlines():
        if match := re.fullmatch(r"(local)?rule (\w+):", line):
            jobs.append([match.group(2), {}, 1])
        elif match := re.fullmatch(r"    resources: (.*)", line):
            jobs[-1][1] = dict(item.split("=", 1) for item in match.group(1).split(", "))
        elif match := re.fullmatch(r"    threads: (\d+)", line):
            jobs[-1][2] = int(match.group(1))
    return [(rule, resources, threads) for rule, resources, threads in jobs if rule != "all"]


def test_every_rule_has_its_configured_resources(workdir: Path) -> None:
    jobs = planned_resources(workdir, "--forceall")
    config = load_config_file(REPO / "config.yaml")
    # MBPP is local here, and the default experiment uses no GENEVA task set.
    assert {rule for rule, _, _ in jobs} == set(RULES) - {"download_mbpp", "download_geneva"}
    for rule, resources, _ in jobs:
        expected = config.resources.of(rule)
        assert resources["mem_mb"] == str(expected.mem_mb), rule
        assert resources["runtime"] == str(expected.runtime), rule
        # device: auto asks for GPUs only where the planning machine has one
        gpus = str(config.resources.gpus if visible_gpus() else 0)
        assert resources.get("gpu") == (gpus if rule in GPU_RULES else None), rule


def test_only_the_rules_that_run_a_model_ask_for_gpus_on_cuda(workdir: Path) -> None:
    path = workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["device"] = "cuda"
    config["resources"]["gpus"] = 2
    path.write_text(yaml.safe_dump(config))
    jobs = planned_resources(workdir, "--forceall")
    with_gpus = {rule for rule, resources, _ in jobs if "gpu" in resources}
    assert with_gpus == {"generate", "finetune", "probe", "probe_generation"}
    assert all(resources["gpu"] == "2" for rule, resources, _ in jobs if rule in with_gpus)
    assert not with_gpus & CPU_ONLY_RULES


def test_device_auto_asks_for_gpus_where_the_planning_machine_has_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = load_config_file(REPO / "config.yaml")
    assert config.device == "auto"
    for gpus, asked in [(0, 0), (4, config.resources.gpus)]:
        monkeypatch.setattr(leti.config, "visible_gpus", lambda gpus=gpus: gpus)
        assert config.job_resources("generate")["gpu"] == asked
        assert "gpu" not in config.job_resources("execute")
    cpu = Config.model_validate({**config.model_dump(mode="json"), "device": "cpu"})
    assert "gpu" not in cpu.job_resources("generate")


@pytest.mark.parametrize(
    ("arguments", "gpus", "expected"),
    [
        (["--cores", "8"], 2, ["--cores", "8", "--resources", "gpu=2"]),
        (["--cores", "8"], 0, ["--cores", "8"]),
        (["--cores", "8", "--resources", "gpu=1"], 2, ["--cores", "8", "--resources", "gpu=1"]),
        (["--profile", "profiles/slurm"], 2, ["--profile", "profiles/slurm"]),
        (["--executor=slurm"], 2, ["--executor=slurm"]),
    ],
)
def test_a_local_run_on_a_gpu_machine_counts_its_gpus(
    monkeypatch: pytest.MonkeyPatch, arguments: list[str], gpus: int, expected: list[str]
) -> None:
    monkeypatch.setattr(leti.model.gpus, "visible_gpus", lambda: gpus)
    assert with_gpu_limit(arguments) == expected


def test_resources_fall_back_rule_then_default() -> None:
    resources = ResourcesConfig.model_validate(
        {"default": {"runtime": 99}, "generate": {"mem_mb": 16000}, "evaluate": {"threads": 3}}
    )
    generate = resources.of("generate")
    assert (generate.threads, generate.mem_mb, generate.runtime) == (4, 16000, 240)  # built-in for the rest
    evaluate = resources.of("evaluate")
    assert (evaluate.threads, evaluate.mem_mb, evaluate.runtime) == (3, 1000, 99)
    with pytest.raises(KeyError):
        resources.of("no_such_rule")


def test_device_reaches_generation_and_fine_tuning_settings() -> None:
    config = load_config_file(REPO / "config.yaml")
    assert config.device == "auto"
    cuda = Config.model_validate({**config.model_dump(mode="json"), "device": "cuda"})
    assert cuda.generation_settings("eval", 1).device == "cuda"
    assert cuda.job_resources("finetune")["gpu"] == 1
    data_parallel = Config.model_validate(
        {
            **cuda.model_dump(mode="json"),
            "finetune": {**cuda.finetune.model_dump(mode="json"), "processes": 4},
        }
    )
    assert data_parallel.job_resources("finetune")["gpu"] == 4
    assert data_parallel.job_resources("generate")["gpu"] == 1
    assert "gpu" not in cuda.job_resources("execute")


def test_devices_resolve() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(DeviceError):
        resolve_device("tpu")


@pytest.mark.parametrize(
    ("capability", "bf16"),
    [((8, 0), True), ((9, 0), True), ((7, 0), False), ((7, 5), False)],
    ids=["A100", "H100", "V100", "T4"],
)
def test_dtypes_follow_the_hardware(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], bf16: bool
) -> None:
    """An A100 or H100 computes bfloat16; a V100 (7.0) or T4 (7.5) only emulates it, and torch's
    default answer counts emulation: such a GPU must generate in float16, not emulated bfloat16."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        # torch's documented behaviour: native from compute capability 8.0, emulated on any other GPU.
        return capability >= (8, 0) or including_emulation

    monkeypatch.setattr(devices.torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda")
    assert inference_dtype("auto", cuda) == (torch.bfloat16 if bf16 else torch.float16)
    assert training_dtype("auto", cuda) == (torch.bfloat16 if bf16 else torch.float32)  # never float16
    assert inference_dtype("float32", cuda) == training_dtype("float32", cuda) == torch.float32
    cpu = torch.device("cpu")
    assert training_dtype("auto", cpu) in (torch.bfloat16, torch.float32)
    assert inference_dtype("auto", cpu) == training_dtype("auto", cpu)
    with pytest.raises(DeviceError):
        training_dtype("float16", cpu)


# oneMKL chooses its kernels once per process, so each check is a fresh process, as every job is.
FIRST_PARALLEL_CALLS = """
import torch
from leti.model.device import VML_OPS, set_cpu_threads

set_cpu_threads(2)
assert torch.get_num_threads() == 2
positions = torch.arange(300)[None].expand(12, 300)[..., None]
# The rotary embedding's angles for 12 x 300 positions, scaled into every op's domain.
angles = positions * torch.tensor([1.0, 0.1, 0.01, 0.001]) / 300 * 0.99 + 0.005
for dtype in (torch.float32, torch.float64):
    for name in VML_OPS:
        # Built as the rotary embedding builds them, right before its cos: this parallel op wakes
        # the second thread, so that both threads start the op together.
        x = torch.cat((angles, angles), dim=-1).to(dtype)
        first, second = getattr(torch, name)(x), getattr(torch, name)(x)
        assert torch.equal(first, second), f"{name} {dtype}: off by {(first - second).abs().max():.2g}"
"""


def test_the_first_parallel_call_of_every_vml_op_equals_the_next() -> None:
    """Without the warm-up in set_cpu_threads, about one fresh process in seven got a wrong first
    call on a 2-core Intel Xeon (bench/vml_race.py; pytorch/pytorch#188792)."""
    for _ in range(8):
        result = subprocess.run([sys.executable, "-c", FIRST_PARALLEL_CALLS], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]


def test_a_job_without_assigned_gpus_takes_free_ones_and_holds_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(leti.model.gpus, "nvidia_gpus", lambda: 3)
    monkeypatch.setattr(leti.model.gpus, "LOCK_FOLDER", tmp_path)
    monkeypatch.setattr(leti.model.gpus, "_held", [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert claim_gpus(1) == [0]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    # Another job on the machine (a lock of its own on the same files) gets the others.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert claim_gpus(2) == [1, 2]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"
    # A scheduler's choice stands; a job larger than the machine is an error, not a wait.
    assert claim_gpus(1) == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(RuntimeError, match="needs 4 GPUs"):
        claim_gpus(4)
    # While all three are held, a fourth job waits; a released GPU is taken at the next poll.
    monkeypatch.setattr(leti.model.gpus.time, "sleep", lambda _: leti.model.gpus._held.pop(0).close())
    assert claim_gpus(1) == [0]
