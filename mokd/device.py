"""Device and numeric-precision choices shared by training, evaluation and analysis.

The same code path serves CPU and CUDA: autocast is entered with the device's type, and a grad scaler is
only active for fp16 (CUDA without bf16).
"""

from __future__ import annotations

import contextlib

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


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the device supports it (CPU, Ampere+), else fp16 on older CUDA GPUs."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise UserError("fp16 mixed precision needs a CUDA device; use bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def autocast(device: torch.device, precision: str):
    """Context manager: autocast to bf16/fp16 for matrix work, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A scaler that is a no-op unless fp16 is used (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
