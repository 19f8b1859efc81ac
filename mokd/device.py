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
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX).

    Without it (an AVX2-only CPU) PyTorch emulates bf16 matrix products, measured 60x slower than fp32 on
    such a machine, so `auto` must not pick bf16 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the device computes it natively (Ampere+ GPUs; CPUs with AVX-512 BF16 or AMX),
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
