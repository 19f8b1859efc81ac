"""Precision choice: bf16 only where the hardware computes it faster than fp32."""

import pytest
import torch

from mokd import device as dev
from mokd.errors import UserError


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    assert dev.resolve_precision("auto", torch.device("cpu")) == expected


def test_explicit_precisions_are_kept_and_fp16_needs_cuda():
    cpu = torch.device("cpu")
    assert dev.resolve_precision("bf16", cpu) == "bf16" and dev.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(UserError, match="CUDA"):
        dev.resolve_precision("fp16", cpu)


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    real_path = dev.Path
    monkeypatch.setattr(dev, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert not dev.cpu_has_native_bf16()
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_fp16\n")
    assert not dev.cpu_has_native_bf16()  # Intel AVX-512 BF16 without AMX: bf16 matmuls measured 2x slower than fp32
    info.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not dev.cpu_has_native_bf16()  # AVX2-only EPYC: bf16 emulated
    info.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert dev.cpu_has_native_bf16()  # Zen 4+: bf16 matmuls measured 2.6x faster than fp32
    info.write_text("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert dev.cpu_has_native_bf16()
