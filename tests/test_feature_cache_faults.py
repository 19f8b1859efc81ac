"""The feature cache under faults (issue 31 item 3): no fault leaves an entry that a later run reads as valid.

Two runs extracting one entry at once, a full disk mid-write, a torchrun rank killed mid-extraction, data files
that change between runs, and private folders left by crashed runs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mokd.data import ImageDataset, build_dataset, parse_data_spec
from mokd.errors import UserError
from mokd_eval import features
from mokd_eval.features import INDEX, OWNER_LOCK, features_for, load_sharded
from mokd_eval.loader import load_models
from tests.ckpt_factory import isolated_cache, make_mokd_checkpoint  # noqa: F401
from tests.test_features import ROOT, TransferSpec, run_worker, worker_env


@pytest.fixture
def model(tmp_path):
    make_mokd_checkpoint(tmp_path / "ours.pth")
    (m,) = load_models(tmp_path / "ours.pth", model="net1")
    return m


def digits(n: int = 8) -> tuple:
    spec = parse_data_spec("digits")
    return spec, build_dataset(spec, "val").subset(range(n))


def complete_entries(root: Path) -> list[Path]:
    """Folders of `root` that a reader would take as entries."""
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / INDEX).is_file()]


def private_folders(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")]


# --------------------------------------------------------------------------------------------------------------
# two runs, one entry


def test_readers_never_see_an_entry_being_written(model, tmp_path):
    spec, ds = digits(6)
    root = features.cache_dir()
    seen = []
    load = ds._load

    def looking(i):
        if root.is_dir():
            seen.append(sorted(p.name for p in root.iterdir() if not p.name.startswith(".")))
        return load(i)

    ds._load = looking
    fs = features_for(model, spec, "val", dataset=ds, device="cpu", batch_size=2, shard_rows=2)
    assert seen and all(names == [] for names in seen)  # while extracting, only the private folder exists
    assert complete_entries(root) == [fs.cache_path] and private_folders(root) == []


def test_the_second_run_to_finish_keeps_the_first_entry(model, monkeypatch):
    """Another run installs the same entry while this one extracts: this one uses it and deletes its copy."""
    spec, ds = digits(6)
    write = features._write_entry
    peer = {}

    def racing(backbone, dataset, folder, **kw):
        write(backbone, dataset, folder, **kw)
        entry = folder.parent / folder.name[1:].split(features.TEMP_MARK)[0]
        shutil.copytree(folder, entry, ignore=shutil.ignore_patterns(OWNER_LOCK))  # the peer was faster
        peer["entry"], peer["inode"] = entry, (entry / INDEX).stat().st_ino

    monkeypatch.setattr(features, "_write_entry", racing)
    said = []
    fs = features_for(model, spec, "val", dataset=ds, device="cpu", log=said.append)
    assert fs.cache_path == peer["entry"] and (fs.cache_path / INDEX).stat().st_ino == peer["inode"]
    assert any("another run cached the same features" in s for s in said)
    assert private_folders(fs.cache_path.parent) == []
    ref = features_for(model, spec, "val", dataset=ds, device="cpu", use_cache=False)
    assert torch.equal(fs.features, ref.features) and torch.equal(fs.labels, ref.labels)


@pytest.mark.slow
def test_two_processes_extracting_one_entry_at_once_both_finish(tmp_path):
    make_mokd_checkpoint(tmp_path / "ours.pth")
    cache, meet = tmp_path / "cache", tmp_path / "meet"
    meet.mkdir()
    runs = [subprocess.Popen([sys.executable, "-m", "tests.dist_features_worker", str(tmp_path / "ours.pth"),
                              str(tmp_path / f"r{i}"), "--cache", str(cache), "--what", "cache", "--meet", str(meet),
                              "--peers", "2"], cwd=ROOT, env=worker_env(), stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    for r in runs:
        _, err = r.communicate(timeout=900)
        assert r.returncode == 0, err[-3000:]
    got = [torch.load(tmp_path / f"r{i}.0", weights_only=True)["cache"] for i in range(2)]
    assert not got[0]["from_cache"] and not got[1]["from_cache"]  # both extracted: neither waited for the other
    assert got[0]["cache_path"] == got[1]["cache_path"]
    assert torch.equal(got[0]["features"], got[1]["features"]) and torch.equal(got[0]["labels"], got[1]["labels"])
    entry = Path(got[0]["cache_path"])
    assert complete_entries(cache) == [entry] and private_folders(cache) == []
    bank, labels, _ = load_sharded(entry)
    assert torch.equal(bank.materialize(), got[0]["features"]) and torch.equal(labels, got[0]["labels"])


# --------------------------------------------------------------------------------------------------------------
# a full disk


@pytest.mark.parametrize("where", ["shard writer", "torch.save"])
def test_a_full_disk_is_one_line_and_leaves_no_entry(model, monkeypatch, where):
    spec, ds = digits(8)
    calls = []
    if where == "shard writer":
        real = features._save_shard

        def filling(blob, path):
            calls.append(path)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(blob, path)

        monkeypatch.setattr(features, "_save_shard", filling)
    else:  # the real writer (save_atomic) meets the full disk inside torch.save
        real = torch.save

        def filling(obj, f, *a, **k):
            calls.append(f)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", filling)
    with pytest.raises(UserError) as e:
        features_for(model, spec, "val", dataset=ds, device="cpu", batch_size=2, shard_rows=2)
    message = str(e.value)
    assert "\n" not in message and "no space left" in message and "--no-cache" in message and "--cache-dir" in message
    root = features.cache_dir()
    assert list(root.rglob(INDEX)) == [] and complete_entries(root) == [] and private_folders(root) == []
    monkeypatch.setattr(*((features, "_save_shard") if where == "shard writer" else (torch, "save")), real)
    again = features_for(model, spec, "val", dataset=ds, device="cpu", batch_size=2, shard_rows=2)
    assert not again.from_cache and len(again) == 8
    ref = features_for(model, spec, "val", dataset=ds, device="cpu", use_cache=False)
    assert torch.equal(again.features, ref.features)


# --------------------------------------------------------------------------------------------------------------
# a torchrun rank killed mid-extraction


@pytest.mark.slow
def test_a_rank_killed_mid_extraction_leaves_no_entry(tmp_path):
    make_mokd_checkpoint(tmp_path / "ours.pth")
    ckpt, cache = str(tmp_path / "ours.pth"), tmp_path / "cache"
    # rank 1 extracts images 10-19 in batches of 5 and dies at image 16, after saving its first 3-row shard
    killed = run_worker([ckpt, str(tmp_path / "k"), "--cache", str(cache), "--what", "cache", "--kill-rank", "1",
                         "--kill-at", "16"], nproc=2)
    assert killed.returncode != 0
    assert complete_entries(cache) == [] and not list(tmp_path.glob("k.*"))
    left = private_folders(cache)  # rank 0 deletes its private folder when it can; torchrun may stop it first
    later = run_worker([ckpt, str(tmp_path / "later"), "--cache", str(cache), "--what", "cache,memory"])
    assert later.returncode == 0, later.stderr[-3000:]
    got = torch.load(tmp_path / "later.0", weights_only=True)
    assert not got["cache"]["from_cache"] and torch.equal(got["cache"]["features"], got["memory"]["features"])
    assert complete_entries(cache) == [Path(got["cache"]["cache_path"])]
    assert not any(p.exists() for p in left) and private_folders(cache) == []  # the killed run's folder is gone


# --------------------------------------------------------------------------------------------------------------
# data that change between runs


def _bmp_folder(root: Path, n: int = 2) -> None:
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):  # BMP: the same size on disk whatever the pixels
                Image.new("RGB", (32, 32), (40 * i, 200 if c == "a" else 20, 90)).save(root / split / c / f"{i}.bmp")


@pytest.mark.parametrize("large", [False, True], ids=["content-hashed", "size-mtime-ctime"])
def test_an_image_replaced_with_the_same_size_and_mtime_is_re_extracted(model, tmp_path, monkeypatch, large):
    if large:
        monkeypatch.setattr(features, "CONTENT_HASH_MAX_FILES", 0)  # as for a set too big to read
    _bmp_folder(tmp_path / "imgs")
    spec = parse_data_spec(str(tmp_path / "imgs"))
    ds = build_dataset(spec, "val")
    a = features_for(model, spec, "val", dataset=ds, device="cpu")
    assert features_for(model, spec, "val", dataset=ds, device="cpu").from_cache
    target = tmp_path / "imgs" / "val" / "a" / "0.bmp"
    st = target.stat()
    time.sleep(0.02)  # past the file system's timestamp tick
    Image.new("RGB", (32, 32), (250, 0, 250)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    b = features_for(model, spec, "val", dataset=build_dataset(spec, "val"), device="cpu")
    assert not b.from_cache and b.cache_path != a.cache_path and not torch.equal(a.features[0], b.features[0])


def test_an_image_added_is_a_new_entry(model, tmp_path):
    _bmp_folder(tmp_path / "imgs")
    spec = parse_data_spec(str(tmp_path / "imgs"))
    a = features_for(model, spec, "val", dataset=build_dataset(spec, "val"), device="cpu")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "imgs" / "val" / "b" / "9.bmp")
    b = features_for(model, spec, "val", dataset=build_dataset(spec, "val"), device="cpu")
    assert not b.from_cache and len(b) == len(a) + 1


def _split_set(root: Path, split_file: Path, classes: list[str]) -> ImageDataset:
    """A transfer-style set: `split_file` lists 'relative/path label' a line (as DTD's or Caltech's splits)."""
    rows = [line.split() for line in split_file.read_text().splitlines() if line.strip()]
    paths = [str(root / r) for r, _ in rows]
    return ImageDataset(classes, [int(y) for _, y in rows], lambda i: Image.open(paths[i]).convert("RGB"),
                        paths=paths)


def test_a_changed_split_file_is_a_new_entry(model, tmp_path):
    root = tmp_path / "set"
    _bmp_folder(root, n=3)
    spec = TransferSpec("folder", root)
    split = tmp_path / "set" / "test1.txt"
    split.write_text("val/a/0.bmp 0\nval/a/1.bmp 0\nval/b/0.bmp 1\n")
    a = features_for(model, spec, "val", dataset=_split_set(root, split, ["a", "b"]), device="cpu")
    assert features_for(model, spec, "val", dataset=_split_set(root, split, ["a", "b"]), device="cpu").from_cache
    split.write_text("val/a/0.bmp 0\nval/a/2.bmp 0\nval/b/0.bmp 1\n")  # another image, same count
    b = features_for(model, spec, "val", dataset=_split_set(root, split, ["a", "b"]), device="cpu")
    assert not b.from_cache and b.cache_path != a.cache_path
    split.write_text("val/a/0.bmp 0\nval/a/2.bmp 1\nval/b/0.bmp 1\n")  # the same images relabelled
    c = features_for(model, spec, "val", dataset=_split_set(root, split, ["a", "b"]), device="cpu")
    assert not c.from_cache and c.cache_path != b.cache_path and c.labels.tolist() == [0, 1, 1]
    assert torch.equal(c.features, b.features)


# --------------------------------------------------------------------------------------------------------------
# what crashed runs leave


def test_left_private_folders_are_cleaned_and_live_ones_kept(model, tmp_path):
    spec, ds = digits(4)
    root = features.cache_dir()
    root.mkdir(parents=True)

    def private(name: str, lock: bool = True) -> Path:
        p = root / name
        p.mkdir()
        torch.save({"features": torch.zeros(2, 64), "labels": torch.zeros(2, dtype=torch.long)}, p / "shard_00000.pt")
        if lock:
            (p / OWNER_LOCK).touch()
        return p

    dead = private(".abc.tmp-dead")  # killed: its lock file is there and nobody holds it
    live = private(".abc.tmp-live")  # another run writing now
    fd = os.open(live / OWNER_LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    young = private(".abc.tmp-young", lock=False)  # made this instant, its lock file not yet there
    old = private(".abc.tmp-old", lock=False)
    for p in (old, *old.iterdir()):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    aside = private(".abc.old-1234", lock=False)  # an invalid entry moved aside, then a crash
    try:
        features_for(model, spec, "val", dataset=ds, device="cpu")
        assert not dead.exists() and not old.exists() and not aside.exists()
        assert live.exists() and young.exists()
    finally:
        os.close(fd)
    features_for(model, spec, "val", dataset=ds, device="cpu")
    assert not live.exists() and young.exists()


def test_an_entry_written_in_place_by_an_older_mokd_and_cut_off_is_replaced(model, monkeypatch):
    spec, ds = digits(6)
    a = features_for(model, spec, "val", dataset=ds, device="cpu", shard_rows=2)
    (a.cache_path / INDEX).unlink()  # the layout before private folders: shards in place, index last, killed
    (a.cache_path / "shard_00001.pt").write_bytes(b"half a shard")
    seen = []
    real = features._read_entry
    monkeypatch.setattr(features, "_read_entry", lambda *p: seen.append(real(*p)) or seen[-1])
    b = features_for(model, spec, "val", dataset=ds, device="cpu", shard_rows=2)
    assert seen[0] is None and not b.from_cache and b.cache_path == a.cache_path
    assert (b.cache_path / INDEX).is_file() and private_folders(b.cache_path.parent) == []
    assert torch.equal(b.features, features_for(model, spec, "val", dataset=ds, device="cpu", use_cache=False).features)
    assert features_for(model, spec, "val", dataset=ds, device="cpu", shard_rows=2).from_cache
