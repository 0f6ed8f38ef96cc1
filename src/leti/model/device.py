"""Where a policy runs, and in which dtype: one place for generation and fine-tuning.

`device` is the config's `auto | cpu | cuda`. bfloat16 is used where the hardware computes it
natively: CUDA GPUs that have it, and CPUs with AVX-512 BF16 or AMX (about 2.7x faster for
batched decoding than float32 there, BENCHMARKS.md); elsewhere float32. Inference on a CUDA GPU
without bfloat16 runs in float16; training never does (its small updates underflow).
"""

from __future__ import annotations

import os

import torch

from leti.errors import LetiError


class DeviceError(LetiError):
    pass


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
        return torch.cuda.is_bf16_supported()
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
