"""Checks of the user documentation (README.md, docs/**.md) against the code, without running anything.

- every `mokd ...` command line (fenced code blocks and inline code; `torchrun ... -m mokd ...` too) names
  commands that exist and options each command accepts, parsed by Click's own parser on the real command
  tree (lazily loaded groups included); Choice values must be among the choices;
- every `python benchmarks/X.py ...` line names a script that exists and options its argparse parser
  defines (read from the script's source: `add_argument("--flag", ...)`, so nothing is run);
- every config key named (`--set a.b=v`, inline `train.knn_max_train`, `net*.thead_lr`) exists in
  mokd/config.py;
- every relative link and image exists, and a `#anchor` names a heading of the target page.

Each check returns a list of problems as strings "file:line: what"; the tests assert the lists are empty.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FILE_SUFFIXES = {"py", "yaml", "yml", "md", "json", "jsonl", "pth", "png", "pdf", "svg", "txt", "csv", "pkl",
                 "safetensors", "sh", "tar", "npz", "pt", "html", "toml", "lock", "gz", "jpeg", "jpg"}


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


# ------------------------------------------------------------------------------------------- collecting


def _code_lines(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines inside fenced code blocks, inline code spans outside them), each with its 1-based line number.
    Backslash continuations inside blocks are joined."""
    block, inline, in_fence, pending, start = [], [], False, "", 0
    for n, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            if line.rstrip().endswith("\\"):
                pending, start = pending + line.rstrip()[:-1] + " ", start or n
                continue
            block.append((start or n, pending + line))
            pending, start = "", 0
        else:
            inline += [(n, m.group(1)) for m in INLINE.finditer(line)]
    return block, inline


def _strip_comment(line: str) -> str:
    return re.split(r"\s#\s?", " " + line, maxsplit=1)[0].strip()


def _split_commands(line: str) -> list[str]:
    """The `mokd ...` and `python benchmarks/...` commands in a shell line (after &&, ;, |, `-m mokd`)."""
    out = []
    for part in re.split(r"\s*(?:&&|;|\|\|?|&)\s*", _strip_comment(line)):
        part = part.strip().lstrip("$ ").strip()
        m = re.search(r"(?:^|\s)(?:python\d?\s+)?-m\s+mokd(\s.*|$)", part)
        if m:
            out.append("mokd" + m.group(1))
        elif re.match(r"mokd(\s|$)", part):
            out.append(part)
        else:
            m = re.search(r"(?:^|\s)python\d?\s+(benchmarks/\S+\.py.*)$", part)
            if m:
                out.append(m.group(1))
    return out


def collect_commands(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    text = path.read_text() if text is None else text
    block, inline = _code_lines(text)
    found = []
    for n, line in block:
        found += [(n, c) for c in _split_commands(line)]
    for n, span in inline:
        if re.match(r"(mokd|torchrun|python\d?)\s", span) or span == "mokd":
            found += [(n, c) for c in _split_commands(span)]
    return found


# ------------------------------------------------------------------------------------------- commands


def _tokens(command: str) -> list[str]:
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    # Documentation shorthands: `[--flag VALUE]` marks an optional part, `...` elides the rest.
    out = []
    for t in tokens:
        if t in ("...", "…", "[...]") or t.startswith("<"):
            continue
        out.append(t.strip("[]") if t.startswith("[") or t.endswith("]") and "=" not in t else t)
    return [t for t in out if t]


def _config_key_problems(key: str) -> str | None:
    """None when `key` (dotted; netX / net* stand for net1 and net2) is a key of mokd.config.Config."""
    from typing import get_type_hints

    from mokd.config import Config

    cls = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if cls is dict:  # netX.kwargs.img_size: a key of a free-form mapping
            return None
        if not dataclasses.is_dataclass(cls):
            return f"config key {key!r}: {'.'.join(parts[:i])} is not a section"
        part = "net1" if part in ("netX", "net*") else part
        hints = get_type_hints(cls)
        if part not in hints:
            return f"config key {key!r} does not exist in mokd/config.py"
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        return f"config key {key!r} names a section, not a key"
    return None


def _set_problems(value: str) -> list[str]:
    """--set a.b=v[,c.d=w]: the keys."""
    key = value.split("=", 1)[0]
    problem = _config_key_problems(key)
    return [problem] if problem else []


def check_mokd_command(command: str, root: click.Command) -> list[str]:
    """Problems of one `mokd ...` line against the Click tree `root` (nothing is executed)."""
    tokens = _tokens(command)[1:]
    cmd, ctx, path = root, click.Context(root, info_name="mokd"), ["mokd"]
    while isinstance(cmd, click.Group):
        # group-level options (--debug, --version, --help) may come before the subcommand
        while tokens and tokens[0].startswith("-"):
            opt = tokens.pop(0)
            if opt.split("=")[0] not in {o for p in cmd.params for o in p.opts + p.secondary_opts} | {"-h", "--help"}:
                return [f"{' '.join(path)}: no option {opt}"]
        if not tokens:
            return []  # `mokd eval` alone: the group exists
        name = tokens.pop(0)
        sub = cmd.get_command(ctx, name)
        if sub is None:
            return [f"{' '.join(path)}: no command {name!r} (has: {', '.join(cmd.list_commands(ctx))})"]
        cmd, ctx, path = sub, click.Context(sub, info_name=name, parent=ctx), path + [name]
    if any(t in ("-h", "--help") for t in tokens):
        return []
    parser = cmd.make_parser(ctx)
    try:
        opts, extra, _ = parser.parse_args(list(tokens))
    except click.UsageError as e:
        return [f"{' '.join(path)}: {e.format_message()}"]
    problems = []
    if extra:
        problems.append(f"{' '.join(path)}: unexpected extra argument(s) {extra}")
    for param in cmd.params:
        value = opts.get(param.name)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(param.type, click.Choice):
            bad = [v for v in values if v not in param.type.choices and not str(v).isupper()]
            if bad:
                problems.append(f"{' '.join(path)}: {param.opts[0]} {bad[0]!r} is not one of {list(param.type.choices)}")
        if param.name == "overrides":
            for v in values:
                problems += [f"{' '.join(path)}: {p}" for p in _set_problems(v)]
    return problems


def benchmark_options(script: Path) -> set[str]:
    """Option strings the script's argparse parser defines, read from its source."""
    opts = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            opts |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return opts | {"-h", "--help"}


def check_benchmark_command(command: str, root: Path = ROOT) -> list[str]:
    tokens = _tokens(command)
    script = root / tokens[0]
    if not script.is_file():
        return [f"{tokens[0]} does not exist"]
    known = benchmark_options(script)
    problems = []
    for i, t in enumerate(tokens[1:], start=1):
        if t.startswith("--"):
            flag = t.split("=")[0]
            if flag not in known:
                problems.append(f"{tokens[0]}: no option {flag} (has: {', '.join(sorted(known))})")
            if flag == "--set" and i + 1 < len(tokens):
                problems += [f"{tokens[0]}: {p}" for p in _set_problems(tokens[i + 1])]
    return problems


def check_commands(path: Path, root_cmd: click.Command, text: str | None = None, root: Path = ROOT) -> list[str]:
    problems = []
    for n, command in collect_commands(path, text):
        found = check_benchmark_command(command, root) if command.startswith("benchmarks/") else \
            check_mokd_command(command, root_cmd)
        problems += [f"{path.name}:{n}: {p}  [{command}]" for p in found]
    return problems


# ------------------------------------------------------------------------------------------- config keys


SECTIONS = ("net1", "net2", "netX", "net*", "data", "augment", "head", "thead", "loss", "optim", "train")
KEY = re.compile(r"^(?:--set\s+)?((?:" + "|".join(re.escape(s) for s in SECTIONS) + r")\.[A-Za-z_][\w/]*)"
                 r"(?:\s*[:=].*)?$")


def check_config_keys(path: Path, text: str | None = None) -> list[str]:
    """Config keys in inline code (`train.knn_max_train`, `loss.st/ct` lists, `key: value`, `key=value`)."""
    text = path.read_text() if text is None else text
    _, inline = _code_lines(text)
    problems = []
    for n, span in inline:
        m = KEY.match(span.strip())
        if not m:
            continue
        dotted = m.group(1)
        section, _, names = dotted.partition(".")
        if names.rsplit(".", 1)[-1] in FILE_SUFFIXES:
            continue
        for name in names.split("/"):
            problem = _config_key_problems(f"{section}.{name}")
            if problem:
                problems.append(f"{path.name}:{n}: {problem}")
    return problems


# ------------------------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text, in_fence, out = path.read_text(), False, set()
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def check_links(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text() if text is None else text
    problems, in_fence = [], False
    for n, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for m in LINK.finditer(line):
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{path.name}:{n}: link target {file_part} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{path.name}:{n}: {dest.name} has no heading #{anchor}")
    return problems
