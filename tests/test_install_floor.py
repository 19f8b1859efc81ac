"""The torch and torchvision floors pyproject.toml declares cover every version-sensitive torch API the code uses.

Each entry of TORCH_APIS is (a pattern found in the code, the torch release that introduced it, the source of
that fact). The test checks that each pattern is still used (so the table does not go stale silently) and that
the declared floor is at least each release; a new API with a version history belongs in the table.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mokd", "mokd_eval", "mokd_analysis", "mokd_bench")

TORCH_APIS = [
    # the safe_globals context manager: not in torch.serialization.__all__ of 2.4 (which has add_safe_globals, new
    # there, pytorch PR #124331), in that of 2.5
    ("torch.serialization.safe_globals", (2, 5), "torch.serialization source, 2.4 vs 2.5"),
    # torch.amp.GradScaler("cuda"/"cpu") replaced torch.cuda.amp.GradScaler in 2.3 (deprecated the latter in 2.4)
    ("torch.amp.GradScaler", (2, 3), "PyTorch 2.3 release notes; torch.amp docs"),
    # torch.load(mmap=True): new in 2.1 (torch.load docs, 'mmap ... added in 2.1')
    ("mmap=True", (2, 1), "torch.load docs"),
    # parametrizations.weight_norm: added in 2.1 (torch.nn.utils.weight_norm deprecated in its favour)
    ("torch.nn.utils.parametrizations import weight_norm", (2, 1), "torch.nn.utils.parametrizations docs"),
    # torch._foreach_copy_: pytorch PR #107226, merged August 2023, first released in 2.1
    ("torch._foreach_copy_", (2, 1), "pytorch PR #107226"),
    # torch.compile and F.scaled_dot_product_attention: PyTorch 2.0
    ("torch.compile(", (2, 0), "PyTorch 2.0 release notes"),
    ("F.scaled_dot_product_attention", (2, 0), "PyTorch 2.0 release notes"),
    # Module.register_forward_hook(..., with_kwargs=True): 2.0
    ("with_kwargs=True", (2, 0), "PyTorch 2.0 release notes (forward hooks with kwargs)"),
    # torch.load(weights_only=True): 1.13
    ("weights_only=True", (1, 13), "PyTorch 1.13 release notes"),
    # torch.autocast(device_type=...): 1.10
    ("torch.autocast(device_type=", (1, 10), "PyTorch 1.10 release notes"),
    # torch.linalg.svdvals / matrix_norm and torch.special.xlogy: 1.9
    ("torch.linalg.svdvals", (1, 9), "PyTorch 1.9 release notes (torch.linalg)"),
    ("torch.special.xlogy", (1, 9), "PyTorch 1.9 release notes (torch.special)"),
]

# torchvision releases paired with torch minors (torchvision's README compatibility table)
TORCHVISION_FOR_TORCH = {(2, 1): (0, 16), (2, 2): (0, 17), (2, 3): (0, 18), (2, 4): (0, 19), (2, 5): (0, 20),
                         (2, 6): (0, 21), (2, 7): (0, 22), (2, 8): (0, 23)}


def _floor(package: str) -> tuple[int, ...]:
    # read as text, not with tomllib, which Python 3.10 (the floor of requires-python) lacks
    text = (ROOT / "pyproject.toml").read_text()
    deps = text[text.index("dependencies = ["):]
    m = re.search(rf'^\s*"{package}\s*>=\s*([0-9.]+)[^"]*",', deps[:deps.index("]")], re.M)
    assert m, f"pyproject.toml's dependencies declare no {package}>=X requirement"
    return tuple(int(x) for x in m.group(1).split("."))[:2]


def _code() -> str:
    return "\n".join(p.read_text() for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")))


@pytest.mark.parametrize("pattern,introduced,source", TORCH_APIS, ids=[a[0] for a in TORCH_APIS])
def test_the_torch_floor_covers_each_api_the_code_uses(pattern, introduced, source):
    assert pattern in _code(), f"{pattern!r} is no longer used: drop it from TORCH_APIS"
    floor = _floor("torch")
    assert floor >= introduced, (f"pyproject.toml says torch>={'.'.join(map(str, floor))}, but the code uses "
                                 f"{pattern}, new in {'.'.join(map(str, introduced))} ({source})")


def test_the_torchvision_floor_is_the_release_paired_with_the_torch_floor():
    assert _floor("torchvision") >= TORCHVISION_FOR_TORCH[_floor("torch")]


def test_the_installed_torch_meets_the_declared_floor():
    import torch

    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= _floor("torch")
