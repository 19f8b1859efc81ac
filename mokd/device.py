"""Device and numeric-precision choices shared by training, evaluation and analysis.

The same code path serves CPU and CUDA: autocast is entered with the device's type, and a grad scaler is
only active for fp16 (CUDA without bf16).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from mokd.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str | None = None) -> torch.device:
    """'auto'/None -> cuda:LOCAL_RANK if available else cpu; otherwise the named device, checked."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device name (expected cpu, cuda, cuda:N or auto)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but CUDA is not available on this machine")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32: with AMX (the amx_bf16 flag), or on an AMD
    CPU with AVX-512 BF16 (Zen 4 and later, whose fp32 AVX-512 units are half as wide as their bf16 dot product).

    Measured on the CPU kinds seen here (torch 2.14, oneDNN 3.12): on an AVX2-only EPYC, bf16 matrix products
    are emulated, 60x slower than fp32; on a Xeon with AVX-512 BF16 but no AMX, a 2048^3 bf16 matmul ran at
    146 GFLOP/s against 294 in fp32 (2 threads) and the default training step took 1.3-1.6x as long in bf16;
    on an EPYC with AVX-512 BF16, a 1024^3 matmul ran at 128 GFLOP/s in bf16 against 49 in fp32 (1 thread)
    and the cpu_long step took 0.63 s in bf16 against 1.10 s in fp32 (benchmarks/train_throughput.py).
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if re.search(r"\bamx_bf16\b", info):
        return True
    return bool(re.search(r"\bAuthenticAMD\b", info) and re.search(r"\bavx512_bf16\b", info))


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products beat fp32 on `device`: CUDA Ampere+, or a CPU with AMX or an AMD one with AVX-512 BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the device computes it faster than fp32 (Ampere+ GPUs; CPUs with AMX, AMD CPUs with AVX-512 BF16),
    else fp16 on older CUDA GPUs and fp32 on other CPUs."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise UserError("fp16 mixed precision needs a CUDA device; use bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """Context manager: autocast to bf16/fp16 for matrix work, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A scaler that is a no-op unless fp16 is used (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


COMPILE_CHOICES = ("auto", "true", "false")


def resolve_compile(setting: str | bool, device: torch.device) -> bool:
    """train.compile: 'auto' -> on for CUDA, off on the CPU (docs/training.md gives the measurement)."""
    setting = str(setting).lower()
    if setting not in COMPILE_CHOICES:
        raise UserError(f"train.compile must be auto, true or false, got {setting!r}")
    if setting == "auto":
        return device.type == "cuda"
    return setting == "true"
