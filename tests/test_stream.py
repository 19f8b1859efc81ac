"""A bank larger than memory: the sharded feature cache, streamed search equal to the in-memory search (torch,
certified on near-ties, FAISS), `mokd eval knn` and `mokd analyze consistency` over many shards equal to one
shard, and the fast linear probe trained on a streamed bank equal to the one trained in memory."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from click.testing import CliRunner

from mokd.cli import cli
from mokd.data import build_dataset, parse_data_spec
from mokd.errors import UserError
from mokd_eval.features import ShardedFeatures, extract_features, extract_to_shards, features_for, shard_plan, \
    shard_rows_for, take_rows
from mokd_eval.knn import certified_search, faiss_available, knn_predict, search
from mokd_eval.linear import LinearSettings, epoch_windows, fast_linear_probe, train_linear_bank
from mokd_eval.loader import load_models
from mokd_eval.records import read_records
from tests.ckpt_factory import isolated_cache, make_mokd_checkpoint  # noqa: F401
from tests.dist_worker import MeanNet, Numbers, shard_cache_worker
from tests.test_knn import near_tie_bank
from tests.test_linear import blobs, colour_folder
from tests.test_linear import make_mokd_checkpoint as make_pair_checkpoint

SIZES = [150, 3, 97, 150]  # uneven blocks, one smaller than k
BACKENDS = ["torch", "certified",
            pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss not installed"))]


@pytest.fixture(scope="module")
def bank_and_queries():
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(400, 24, generator=g), dim=1), F.normalize(torch.randn(60, 24, generator=g), dim=1)


# --------------------------------------------------------------------------------------------------------------
# streamed search


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_search_equals_the_tensor_search(bank_and_queries, backend):
    bank, queries = bank_and_queries
    truth_sims, truth_idx = search(bank, queries, 20, backend="torch", log=None)
    whole_sims, whole_idx = search(bank, queries, 20, backend=backend, chunk_size=16, log=None)
    messages = []
    sims, idx = search(bank.split(SIZES), queries, 20, backend=backend, chunk_size=16, log=messages.append)
    assert torch.equal(idx, truth_idx) and torch.equal(idx, whole_idx)
    torch.testing.assert_close(sims, truth_sims, rtol=0, atol=1e-6)
    torch.testing.assert_close(sims, whole_sims, rtol=0, atol=1e-6)
    assert "bank 400 x 24" in messages[0] and "streamed in 4 blocks of up to 150 rows" in messages[0]


@pytest.mark.parametrize("margin", [None, 0])
@pytest.mark.parametrize("twins", ["apart", "together"])
def test_streamed_certified_search_is_exact_on_near_ties(margin, twins):
    bank, queries = near_tie_bank()  # rows i and i + 750 are near-duplicates ("twins")
    if twins == "together":  # each row next to its twin, most in the first block
        bank, sizes = bank[torch.stack([torch.arange(750), torch.arange(750) + 750], 1).flatten()], [1100, 400]
    else:
        sizes = [400, 351, 749]
    truth_sims, truth_idx = search(bank, queries, 25, backend="torch", log=None)
    sims, idx, redone = certified_search(list(bank.split(sizes)), queries, 25, margin=margin, log=None)
    assert torch.equal(idx, truth_idx)
    torch.testing.assert_close(sims, truth_sims, rtol=0, atol=1e-6)
    if margin is None:  # certification survives streaming: the bound of every block is cleared
        assert redone < len(queries)
    elif twins == "together":  # no spare candidates and the k-th place between twins of one block: re-searched
        assert redone > 0


def test_knn_predict_streams_unnormalised_blocks():
    g = torch.Generator().manual_seed(3)
    train, labels, test = torch.randn(400, 24, generator=g) * 5, torch.randint(0, 9, (400,), generator=g), \
        torch.randn(60, 24, generator=g)
    whole = knn_predict(train, labels, test, ks=(1, 10, 200), num_classes=9, backend="torch", log=None)
    for backend in ("torch", "certified"):
        streamed = knn_predict(train.split(SIZES), labels, test, ks=(1, 10, 200), num_classes=9, backend=backend,
                               log=None)
        assert list(streamed) == list(whole) and all(torch.equal(streamed[k], whole[k]) for k in whole)
    with pytest.raises(TypeError, match="one-shot"):
        knn_predict(iter(train.split(SIZES)), labels, test, ks=(10,), num_classes=9, log=None)


# --------------------------------------------------------------------------------------------------------------
# the sharded cache


def test_shard_size_and_plan():
    assert shard_rows_for(2048) == 2**17  # 1 GiB of fp32 rows of ImageNet's ResNet-50 features
    assert shard_rows_for(2048, 10) == 10
    assert shard_plan(11, 1, 4) == [(0, 0, 4), (0, 4, 8), (0, 8, 11)]
    # two ranks: slices [0, 6) and [6, 11), each cut on its own, so shard order is row order
    assert shard_plan(11, 2, 4) == [(0, 0, 4), (0, 4, 6), (1, 6, 10), (1, 10, 11)]


def test_shard_rows_env(monkeypatch):
    monkeypatch.setenv("MOKD_SHARD_ROWS", "5")
    assert shard_rows_for(64) == 5
    monkeypatch.setenv("MOKD_SHARD_ROWS", "0")
    with pytest.raises(UserError, match="MOKD_SHARD_ROWS"):
        shard_rows_for(64)


def test_shards_round_trip_across_batch_boundaries(tmp_path):
    ref_f, ref_y = extract_features(MeanNet(), Numbers(11), device="cpu", batch_size=3)
    folder = tmp_path / "entry"
    bank, labels = extract_to_shards(MeanNet(), Numbers(11), folder, device="cpu", batch_size=3, shard_rows=4,
                                     meta={"split": "train"})
    assert bank.rows == (4, 4, 3) and bank.files == ("shard_00000.pt", "shard_00001.pt", "shard_00002.pt")
    assert len(bank) == 11 and bank.shape == (11, 3)
    assert [len(b) for b in bank] == [4, 4, 3] and torch.equal(torch.cat(list(bank)), ref_f)
    assert torch.equal(bank.materialize(), ref_f) and torch.equal(labels, ref_y)
    shard = torch.load(folder / "shard_00001.pt", weights_only=True)
    assert shard["features"][:, 0].tolist() == [4, 5, 6, 7] and shard["labels"].tolist() == [1, 2, 0, 1]
    index = json.loads((folder / "index.json").read_text())
    assert index["rows"] == [4, 4, 3] and index["dim"] == 3 and index["n"] == 11 and index["split"] == "train"
    # rewritten with larger shards: the earlier attempt's extra shard goes
    bank, _ = extract_to_shards(MeanNet(), Numbers(11), folder, device="cpu", batch_size=3, shard_rows=6)
    assert bank.rows == (6, 5) and sorted(p.name for p in folder.iterdir()) == \
        ["index.json", "shard_00000.pt", "shard_00001.pt"]
    assert torch.equal(torch.cat(list(bank)), ref_f)


class Breaks(Numbers):
    def __getitem__(self, i):
        if i == 9:
            raise OSError("disk gone")
        return super().__getitem__(i)


def test_a_crash_leaves_whole_shards_and_no_index(tmp_path):
    with pytest.raises(OSError, match="disk gone"):
        extract_to_shards(MeanNet(), Breaks(11), tmp_path / "e", device="cpu", batch_size=3, shard_rows=4)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["shard_00000.pt", "shard_00001.pt"]


def test_features_for_shards_reads_lazily_and_recomputes_incomplete_entries(tmp_path, monkeypatch):
    make_mokd_checkpoint(tmp_path / "ours.pth")
    (m,) = load_models(tmp_path / "ours.pth", model="net1")
    spec = parse_data_spec("digits")
    ds = build_dataset(spec, "val").subset(range(20))
    kw = dict(dataset=ds, device="cpu", batch_size=8)
    monkeypatch.setenv("MOKD_SHARD_ROWS", "7")
    ref = features_for(m, spec, "val", use_cache=False, **kw)
    assert isinstance(ref.bank, torch.Tensor) and ref.cache_path is None
    a = features_for(m, spec, "val", **kw)
    assert not a.from_cache and isinstance(a.bank, ShardedFeatures) and a.bank.rows == (7, 7, 6)
    assert len(a) == 20 and a.dim == 64 and torch.equal(a.labels, ref.labels)
    assert torch.equal(torch.cat(list(a.bank)), ref.features)
    b = features_for(m, spec, "val", **kw)
    assert b.from_cache and isinstance(b.bank, ShardedFeatures) and b.cache_path == a.cache_path
    assert torch.equal(b.features, ref.features) and isinstance(b.bank, torch.Tensor)  # materialised on demand
    index = a.cache_path / "index.json"
    index.unlink()  # a folder without its index is an incomplete entry
    c = features_for(m, spec, "val", **kw)
    assert not c.from_cache and index.is_file() and torch.equal(c.features, ref.features)
    (a.cache_path / "shard_00001.pt").write_bytes(b"not a tensor file")  # a damaged shard
    d = features_for(m, spec, "val", **kw)
    assert not d.from_cache and torch.equal(d.features, ref.features)
    # an entry of the earlier single-file layout is still read
    shutil.rmtree(a.cache_path)
    single = a.cache_path.parent / f"{a.cache_path.name}.pt"
    torch.save({"features": ref.features, "labels": ref.labels, "classes": list(ds.classes)}, single)
    e = features_for(m, spec, "val", **kw)
    assert e.from_cache and e.cache_path == single and torch.equal(e.features, ref.features)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("n", [5, 1])  # 1: the second rank has no rows
def test_two_ranks_write_their_own_shards_in_row_order(tmp_path, n):
    ref_f, ref_y = extract_features(MeanNet(), Numbers(n), device="cpu", batch_size=2)
    folder = tmp_path / "entry"
    mp.spawn(shard_cache_worker, args=(2, _free_port(), n, str(folder)), nprocs=2, join=True)
    for rank in range(2):
        feats, labels, rows = torch.load(f"{folder}.{rank}", weights_only=True)
        assert torch.equal(feats, ref_f) and torch.equal(labels, ref_y)
        assert rows == ([2, 1, 2] if n == 5 else [1])


# --------------------------------------------------------------------------------------------------------------
# mokd eval knn end to end


def test_knn_cli_over_many_shards_equals_one_shard_and_no_cache(tmp_path, monkeypatch):
    make_mokd_checkpoint(tmp_path / "ours.pth", mode="independent")
    base = ["eval", "knn", str(tmp_path / "ours.pth"), "--model", "net1", "--ks", "10,20", "--batch-size", "512"]

    def run(name, *extra):
        r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        (record,) = read_records(tmp_path / name)
        return r.output, record

    _, memory = run("memory", "--no-cache", "--backend", "torch")
    monkeypatch.setenv("MOKD_SHARD_ROWS", "100")
    said, many = run("many", "--cache-dir", str(tmp_path / "c100"), "--backend", "torch")
    assert "15 shard(s) of up to 100 rows" in said  # 1437 training images
    assert "bank 1437 x 64 float32" in said and "streamed in 15 blocks of up to 100 rows" in said
    said, certified = run("certified", "--cache-dir", str(tmp_path / "c100"), "--backend", "certified")
    assert "from cache" in said and "streamed in 15 blocks of up to 100 rows" in said
    monkeypatch.delenv("MOKD_SHARD_ROWS")
    said, one = run("one", "--cache-dir", str(tmp_path / "c1"), "--backend", "torch")
    assert "1 shard(s) of up to 1437 rows" in said and "streamed" not in said
    for record in (many, certified, one):
        assert record["metrics"] == memory["metrics"]
    assert certified["settings"]["features_cached"] and not many["settings"]["features_cached"]


# --------------------------------------------------------------------------------------------------------------
# the fast linear probe on a streamed bank


def sharded(x: torch.Tensor, y: torch.Tensor, folder, shard_rows: int) -> ShardedFeatures:
    """Features x [N, D] written into the cache's shard layout (an identity 'backbone' over the rows)."""
    bank, labels = extract_to_shards(torch.nn.Identity(), torch.utils.data.TensorDataset(x, y), folder,
                                     device="cpu", batch_size=64, shard_rows=shard_rows)
    assert torch.equal(labels, y)
    return bank


@pytest.fixture
def count_reads(monkeypatch):
    """Rows read per ShardedFeatures.take call; materialising a whole bank fails the test."""
    reads, take = [], ShardedFeatures.take

    def counted(self, rows):
        reads.append(len(rows))
        return take(self, rows)

    def refuse(self):
        raise AssertionError(f"a bank of {len(self)} rows was read whole")

    monkeypatch.setattr(ShardedFeatures, "take", counted)
    monkeypatch.setattr(ShardedFeatures, "materialize", refuse)
    return reads


def test_rows_are_read_from_the_shards_that_hold_them(tmp_path):
    x, y = blobs(100, 6, 3, seed=0)
    bank = sharded(x, y, tmp_path / "b", shard_rows=9)
    rows = torch.tensor([99, 0, 9, 8, 8, 45, 17])  # any order, repeats, shard edges
    assert torch.equal(take_rows(bank, rows), x[rows]) and torch.equal(take_rows(x, rows), x[rows])


def test_epoch_windows_deal_every_row_once_in_runs():
    windows = epoch_windows(1000, 300, 16, seed=0, epoch=0)
    assert torch.equal(torch.cat(windows).sort().values, torch.arange(1000))
    assert all(torch.equal(w, w.sort().values) and len(w) <= 300 for w in windows) and len(windows) == 4
    runs = [(w // 16).unique() for w in windows]  # whole runs of 16 rows (the last run has 8), 18 to a window
    assert [len(r) for r in runs] == [18, 18, 18, 9] and all(len(w) == 16 * len(r) - 8 * (62 in r)
                                                              for w, r in zip(windows, runs))
    assert all(r.max() - r.min() > 2 * len(r) for r in runs)  # from all over the bank, not one stretch of it
    assert [w.tolist() for w in windows] == [w.tolist() for w in epoch_windows(1000, 300, 16, seed=0, epoch=0)]
    assert [w.tolist() for w in windows] != [w.tolist() for w in epoch_windows(1000, 300, 16, seed=0, epoch=1)]
    assert len(epoch_windows(300, 300, 16, seed=0, epoch=0)) == 1


def test_streamed_linear_bank_equals_the_in_memory_one(tmp_path, count_reads):
    x, y = blobs(600, 32, 5, seed=0, spread=2.0)
    rows = torch.arange(600)[torch.arange(600) % 7 != 3]  # a held-out part left aside
    kw = dict(num_classes=5, epochs=3, batch_size=64, warmup_epochs=1, seed=3, rows=rows, window_rows=100,
              chunk_rows=16)
    memory = train_linear_bank(x, y, [0.05, 0.5], **kw)
    streamed = train_linear_bank(sharded(x, y, tmp_path / "b", shard_rows=37), y, [0.05, 0.5], **kw)
    torch.testing.assert_close(streamed.weight, memory.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(streamed.bias, memory.bias, rtol=0, atol=1e-6)
    assert count_reads and max(count_reads) <= 100  # a window at a time, never the bank
    assert (memory(x).argmax(-1) == y).float().mean(1).min() > 0.9  # and it learnt


def test_fast_probe_on_shards_equals_the_probe_in_memory(tmp_path, count_reads):
    x, y = blobs(300, 16, 4, seed=1, spread=2.0)
    vx, vy = blobs(120, 16, 4, seed=1, spread=2.0)
    s = LinearSettings(epochs=4, batch_size=32, warmup_epochs=1, lr_grid=(0.01, 0.1, 1.0), holdout=0.2)
    memory = fast_linear_probe(x, y, vx, vy, num_classes=4, settings=s, seed=5, log=lambda _: None)
    streamed = fast_linear_probe(sharded(x, y, tmp_path / "t", 23), y, sharded(vx, vy, tmp_path / "v", 11), vy,
                                 num_classes=4, settings=s, seed=5, log=lambda _: None)
    assert streamed == memory and memory["top1"] > 80


def test_linear_fast_cli_over_many_shards_equals_no_cache(tmp_path, monkeypatch, count_reads):
    ckpt = make_pair_checkpoint(tmp_path / "pair.pth")
    data = colour_folder(tmp_path / "data")
    base = ["eval", "linear", str(ckpt), "--data", str(data), "--model", "net2", "--fast", "--epochs", "4",
            "--batch-size", "8", "--warmup-epochs", "1", "--lr-grid", "0.01,0.1,1", "--holdout", "0.25",
            "--avgpool", "--n-last-blocks", "2", "--device", "cpu", "--num-workers", "0"]

    def run(name, *extra):
        r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        (record,) = read_records(tmp_path / name)
        return r.output, record

    _, memory = run("memory", "--no-cache")
    monkeypatch.setenv("MOKD_SHARD_ROWS", "5")
    said, many = run("many", "--cache-dir", str(tmp_path / "c"))
    assert "7 shard(s) of up to 5 rows" in said and "4 shard(s) of up to 5 rows" in said  # 32 train, 16 val
    assert many["metrics"] == memory["metrics"] and many["settings"]["feature_dim"] == 3 * 64
    assert count_reads and max(count_reads) <= 32


def test_consistency_over_many_shards_equals_one_shard(tmp_path, monkeypatch):
    make_mokd_checkpoint(tmp_path / "pair.pth")
    data = colour_folder(tmp_path / "data")  # 32 train, 16 val images
    read_whole = []
    materialize = ShardedFeatures.materialize
    monkeypatch.setattr(ShardedFeatures, "materialize", lambda self: read_whole.append(len(self)) or materialize(self))

    def run(name):
        monkeypatch.setenv("MOKD_CACHE", str(tmp_path / f"cache-{name}"))
        r = CliRunner().invoke(cli, ["analyze", "consistency", str(tmp_path / "pair.pth"), "--data", str(data),
                                     "--k", "5", "--device", "cpu", "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        (record,) = read_records(tmp_path / name)
        return record

    monkeypatch.setenv("MOKD_SHARD_ROWS", "5")
    many = run("many")
    assert len(list((tmp_path / "cache-many").glob("*/shard_00006.pt"))) == 2  # each model's train bank: 7 shards
    monkeypatch.delenv("MOKD_SHARD_ROWS")
    one = run("one")
    assert many["metrics"] == one["metrics"] and 0 <= one["metrics"]["consistency"] <= 1
    assert set(read_whole) == {16}  # the queries only: no training bank was read whole
