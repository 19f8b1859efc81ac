"""The README and docs/ against the code: commands, options, config keys and links (tests/docs_check.py)."""

import click
import pytest

from mokd.cli import cli
from tests import docs_check
from tests.docs_check import ROOT, check_commands, check_config_keys, check_links, doc_files

DOCS = doc_files()


def test_the_docs_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "docs/training.md", "docs/evaluation.md", "docs/monitoring.md",
            "docs/troubleshooting.md"} <= names
    commands = [c for p in DOCS for _, c in docs_check.collect_commands(p)]
    assert sum(c.startswith("mokd ") for c in commands) > 50  # the collector sees the commands at all
    assert any(c.startswith("benchmarks/") for c in commands)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_documented_commands_exist(path):
    assert check_commands(path, cli) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_documented_config_keys_exist(path):
    assert check_config_keys(path) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_images_exist(path):
    assert check_links(path) == []


@pytest.mark.parametrize("script", sorted((ROOT / "examples" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_slurm_scripts_run_existing_commands(script):
    text = script.read_text()
    commands = docs_check.collect_commands(script, f"```bash\n{text}\n```\n")
    assert any(c.startswith("mokd train") for _, c in commands)
    assert check_commands(script, cli, f"```bash\n{text}\n```\n") == []


# ---------------------------------------------------------------- the checks fail when the docs go stale


def _tool(option: str) -> click.Group:
    @click.group()
    def root():
        pass

    @root.command("train")
    @click.option(option, type=int)
    @click.option("--mode", type=click.Choice(["a", "b"]))
    def train(**_):
        pass

    return root


SNIPPET = """# Training
```bash
mokd train --epochs 3 --mode a   # a comment
```
Or inline: `mokd train --epochs 5`.
"""


def test_a_renamed_option_fails_the_check(tmp_path):
    doc = tmp_path / "x.md"
    assert check_commands(doc, _tool("--epochs"), SNIPPET) == []
    problems = check_commands(doc, _tool("--num-epochs"), SNIPPET)
    assert len(problems) == 2 and all("--epochs" in p for p in problems)  # block and inline both caught


@pytest.mark.parametrize("line, needle", [
    ("mokd train --epoch 3", "--epoch"),
    ("mokd evaluate knn ckpt.pth", "'evaluate'"),
    ("mokd eval knn ckpt.pth --backend annoy", "annoy"),
    ("mokd eval knn a.pth b.pth", "extra argument"),
    ("mokd train --set train.knn_max_trian=5", "train.knn_max_trian"),
    ("torchrun --nproc_per_node=8 -m mokd train --resum", "--resum"),
    ("python benchmarks/knn.py --bnak 10", "--bnak"),
    ("python benchmarks/nothere.py", "does not exist"),
    ("python benchmarks/reproduce.py --set loss.nope=1", "loss.nope"),
])
def test_stale_commands_are_caught(tmp_path, line, needle):
    problems = check_commands(tmp_path / "x.md", cli, f"```bash\n{line}\n```\n")
    assert problems and needle in problems[0]


def test_stale_keys_and_links_are_caught(tmp_path):
    doc = tmp_path / "x.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    text = ("`train.knn_max_train` `loss.st/ct/nope` `thead.use_bn: true` `netX.thead_lr` `net2.kwargs.img_size`\n"
            "`optim` is a section, `train.py` a file, `data.spec=digits` fine, `head.bogus` not.\n"
            "[ok](there.md#a-heading) [gone](missing.md) [bad anchor](there.md#nope) ![img](fig.png)\n")
    keys = check_config_keys(doc, text)
    assert len(keys) == 2 and "loss.nope" in keys[0] and "head.bogus" in keys[1]
    links = check_links(doc, text)
    assert len(links) == 3 and "missing.md" in links[0] and "#nope" in links[1] and "fig.png" in links[2]
