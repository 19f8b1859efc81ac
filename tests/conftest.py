import os
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import TINY_OVERRIDES

# Two cores: keep intra-op threads small so parallel pieces of the suite do not fight.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))



@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory: tiny_cfg(*extra_overrides) -> Config of a tiny CNN+ViT pair on 48 digits, in tmp_path."""
    from mokd.config import load_config

    def make(*extra: str, out: str | None = None):
        return load_config(None, [*TINY_OVERRIDES, f"train.output_dir={out or tmp_path / 'run'}", *extra])

    return make


PATH_TOKEN = re.compile(r"[^\s'\"(),;]+")


def case_changed_paths(message: str, cwd: Path | None = None) -> list[str]:
    """Paths in `message` that name an existing file or folder with other letter case (e.g. "Out/last.pth"
    for out/last.pth): a message must write a path exactly as it is."""
    cwd = cwd or Path.cwd()
    changed = []
    for token in PATH_TOKEN.findall(message):
        token = token.rstrip(".:")
        if "/" not in token and "." not in token.strip("."):
            continue
        here = Path("/") if token.startswith("/") else cwd
        for part in Path(token).parts:
            if part == "/":
                continue
            if (here / part).exists():
                here = here / part
                continue
            try:
                twins = [p for p in os.listdir(here) if p.lower() == part.lower()]
            except OSError:
                twins = []
            if twins:
                changed.append(token)
            break
    return changed


# The trainer (with its run folder and checkpoint code) and the eval loader: where messages name the user's paths.
CHECKED_MODULES = ("mokd.trainer", "mokd.rundir", "mokd.checkpoint", "mokd.preemption", "mokd_eval.loader",
                   "mokd_eval.formats", "mokd_eval.architecture")


@pytest.fixture(autouse=True)
def user_errors_keep_path_case(monkeypatch):
    """Every UserError the trainer or the eval loader raises in the suite: no path in its message has its
    letter case changed (issue 28: "Out/last.pth" for out/last.pth)."""
    from mokd.errors import UserError

    changed = []
    real_init = UserError.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name == "__init__":  # a subclass's own __init__
            frame = frame.f_back
        raised_in = frame.f_globals.get("__name__", "") if frame is not None else ""
        if raised_in in CHECKED_MODULES and args and isinstance(args[0], str):
            changed.extend((token, args[0]) for token in case_changed_paths(args[0]))

    monkeypatch.setattr(UserError, "__init__", init)
    yield changed
    assert not changed, f"UserError messages that change the case of a path: {changed}"
