"""Where a policy runs, and in which dtype: one place for generation and fine-tuning.

`device` is the config's `auto | cpu | cuda`. bfloat16 is used where the hardware computes it
natively: CUDA GPUs of compute capability 8.0 and later (Ampere on), ROCm GPUs, and CPUs with
AVX-512 BF16 or AMX; elsewhere float32, since emulated bfloat16 is far slower
(docs/running.md#how-long-it-takes). Inference on a CUDA GPU without native bfloat16 (a V100, a
T4) runs in float16; training never does (its small updates underflow).

`set_cpu_threads` is how every stage sets torch's CPU threads: it also works around a race in
oneMKL that otherwise makes reruns of one job differ.
"""

from __future__ import annotations

import os

import torch

from leti.errors import LetiError

# ATen's float and double unary ops that call oneMKL's vector math (VML), as aten/src/ATen/cpu/vml.h
# lists them.
VML_OPS = (
    "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp",
    "log", "log10", "log2", "sin", "sqrt", "tan", "tanh", "trunc",
)  # fmt: skip


class DeviceError(LetiError):
    pass


def set_cpu_threads(threads: int | None) -> None:
    """torch's intra-op threads (None keeps torch's count), with each VML kernel resolved first, on
    this one thread.

    oneMKL chooses a VML function's kernel on its first call. When two intra-op threads make that
    first call at once, one of them can run a low-accuracy kernel on its part of the tensor
    (pytorch/pytorch#188792; oneMKL 2024.2, as torch 2.13's wheels bundle it). On a 2-core Intel
    Xeon a fresh process's first `cos`, `sin`, `exp` or `log` came out wrong (up to 1.5e-4 for `cos`)
    in 28 of 200 processes, so one job rerun wrote other numbers. A one-element call of each op,
    before any parallel one, settles every dispatch; `bench/vml_race.py` measures the race with
    and without it.
    """
    if threads:
        torch.set_num_threads(threads)
    for dtype in (torch.float32, torch.float64):
        element = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_OPS:
            getattr(torch, name)(element)


def resolve_device(name: str) -> torch.device:
    """`auto`: the first CUDA GPU if this process sees one, else the CPU. `cuda` without a
    visible GPU is an error, not a silent fall back to a CPU run that takes days."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise DeviceError(
                "device: cuda, but this process sees no CUDA GPU"
                + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                + f"; torch {torch.__version__} was built "
                + (f"for CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA")
                + ". Use device: cpu or auto, or run the job where a GPU is allocated."
            )
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise DeviceError(f"unknown device {name!r}; expected auto, cpu or cuda")


def native_bf16(device: torch.device) -> bool:
    """Does this device compute bfloat16 natively?"""
    if device.type == "cuda":
        # By default torch also counts a GPU that merely emulates bfloat16 (a V100, a T4: float32
        # kernels, slower than float16 there).
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def inference_dtype(dtype_name: str, device: torch.device) -> torch.dtype:
    """The dtype a policy generates in. `auto`: bfloat16 where native, float16 on a CUDA GPU
    without bfloat16, else float32; any other name is that torch dtype."""
    if dtype_name != "auto":
        return getattr(torch, dtype_name)
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def training_dtype(dtype_name: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights during fine-tuning. `auto`: bfloat16 where native, else
    float32 (never float16)."""
    if dtype_name == "float16":
        raise DeviceError("fine-tuning in float16 is not supported; use bfloat16 or float32")
    if dtype_name != "auto":
        return getattr(torch, dtype_name)
    return torch.bfloat16 if native_bf16(device) else torch.float32
