"""Faults a cluster throws at a run folder: each ends with the run intact, a one-line message and the right exit."""

import errno
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mokd.checkpoint import load_file
from mokd.cli import cli
from tests.tiny import TINY_OVERRIDES, read_log


def tiny_args(out, *extra):
    args = [a for o in TINY_OVERRIDES for a in ("--set", o)]
    for e in extra:
        args += ["--set", e]
    return ["train", *args, "--out", str(out)]


def run(args):
    return CliRunner().invoke(cli, args)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch tiny run with checkpoint_0001.pth; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    res = run(tiny_args(out, "train.save_every=1") + ["--epochs", "1"])
    assert res.exit_code == 0, res.output
    return out


def copy_run(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def test_1_a_blow_up_is_never_saved(tmp_path):
    # 1 step per epoch; warm-up makes step 0's lr 0, so epoch 1 saves; at step 1 a huge lr times a huge weight
    # decay sends the weights to inf (torch refuses an lr beyond float range itself).
    out = tmp_path / "run"
    res = run(tiny_args(out, "data.subset=16", "net1.lr=1e37", "net1.weight_decay=1e10",
                        "net1.weight_decay_end=1e10") + ["--epochs", "2"])
    assert res.exit_code != 0
    assert "non-finite values after step 1 (epoch 2) in" in res.output and "student.net1." in res.output
    assert f"not saved: {out / 'last.pth'} (after epoch 1) is untouched" in res.output
    assert "Traceback" not in res.output
    ckpt = load_file(out / "last.pth")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert leftovers(out) == []  # no temp file, no lock


@pytest.mark.slow
def test_2_run_folder_is_guarded(finished, tmp_path):
    from mokd.rundir import RunLock

    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    res = run(tiny_args(out) + ["--epochs", "1"])  # a second run into a finished folder, without --resume
    assert res.exit_code != 0 and "already holds a run" in res.output and "--resume" in res.output
    assert "--overwrite" in res.output and snapshot(out) == before and leftovers(out) == []

    lock = RunLock(out)  # a concurrent start: another live process holds the folder
    assert lock.acquire() is None
    try:
        res = run(["train", "--out", str(out), "--resume", "--epochs", "2"])
        assert res.exit_code != 0 and "in use by another mokd train" in res.output
        assert f"pid {os.getpid()}" in res.output and snapshot(out)["last.pth"] == before["last.pth"]
    finally:
        lock.release()

    # A killed run left: a stale lock, a half-written temp file, a truncated last.pth. --resume copes.
    (out / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": "gone", "started": "yesterday"}))
    (out / ".last.pth.x1y2.tmp").write_bytes(b"partial")
    (out / "last.pth").write_bytes(before["last.pth"][: len(before["last.pth"]) // 2])
    res = run(["train", "--out", str(out), "--resume", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert "took over a stale lock (pid 4206649 on host gone" in res.output
    assert "removed 1 temporary file(s)" in res.output
    assert "last.pth is damaged" in res.output and "passing over it" in res.output
    assert f"resumed from {out / 'checkpoint_0001.pth'} (after epoch 1)" in res.output
    assert load_file(out / "last.pth")["epoch"] == 2 and leftovers(out) == []

    # --overwrite starts over: the old run's files go, a fresh run is written.
    res = run(tiny_args(out) + ["--epochs", "1", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "--overwrite: deleted" in res.output and not (out / "checkpoint_0001.pth").exists()


@pytest.mark.slow
def test_2_a_kill_between_the_numbered_copy_and_last_loses_nothing(finished, tmp_path, monkeypatch):
    import mokd.trainer as trainer

    out = copy_run(finished, tmp_path)
    real = trainer.save_atomic

    def killed_before_last(obj, path):
        if path.name == "last.pth" and obj["epoch"] == 2:
            raise KeyboardInterrupt("killed between the two writes")
        real(obj, path)

    monkeypatch.setattr(trainer, "save_atomic", killed_before_last)
    res = run(["train", "--out", str(out), "--resume", "--epochs", "2"])  # the kill lands in the final epoch
    assert res.exit_code != 0 and (out / "checkpoint_0002.pth").exists()
    assert load_file(out / "last.pth")["epoch"] == 1
    monkeypatch.setattr(trainer, "save_atomic", real)
    res = run(["train", "--out", str(out), "--resume", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert "checkpoint_0002.pth (epoch 2) is newer than last.pth" in res.output
    assert f"resumed from {out / 'checkpoint_0002.pth'}" in res.output
    # no epoch was left to train, and last.pth still gets the newest state: eval and export read last.pth
    assert (out / "last.pth").read_bytes() == (out / "checkpoint_0002.pth").read_bytes()
    assert res.output.strip().splitlines()[-1] == f"done: {out / 'last.pth'}"
    assert [p.name for p in sorted(out.glob("checkpoint_*"))] == ["checkpoint_0001.pth", "checkpoint_0002.pth"]
    assert leftovers(out) == []


def test_2_b_a_truncated_last_pth_is_rewritten_by_the_resume(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "last.pth").write_bytes(b"")  # a finished run whose last.pth a copy cut to 0 bytes
    res = run(["train", "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert "is empty (0 bytes)" in res.output and f"resumed from {out / 'checkpoint_0001.pth'}" in res.output
    assert (out / "last.pth").read_bytes() == (out / "checkpoint_0001.pth").read_bytes()
    assert load_file(out / "last.pth")["epoch"] == 1
    assert res.output.strip().splitlines()[-1] == f"done: {out / 'last.pth'}" and leftovers(out) == []


def poison(ckpt, epoch=None):
    """NaN in one weight of net1's student (and, given `epoch`, the checkpoint moved to it); returns its name."""
    key = next(k for k, v in ckpt["model"].items() if k.startswith("student.net1.backbone.") and v.is_floating_point())
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))
    if epoch is not None:
        ckpt["step"] = ckpt["step"] // ckpt["epoch"] * epoch
        ckpt["epoch"] = epoch
    return key


def test_2_c_resuming_non_finite_weights_is_refused_naming_the_clean_checkpoint(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    clean = (out / "checkpoint_0001.pth").read_bytes()
    ckpt = load_file(out / "last.pth")
    key = poison(ckpt, epoch=2)  # a later epoch, written by an older version that saved NaN
    torch.save(ckpt, out / "last.pth")
    torch.save(ckpt, out / "checkpoint_0002.pth")
    before = snapshot(out)
    res = run(["train", "--out", str(out), "--resume", "--epochs", "2"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert f"{out / 'last.pth'} (after epoch 2) holds non-finite values (NaN or inf) in {key}" in res.output
    assert f"the newest clean checkpoint is {out / 'checkpoint_0001.pth'} (after epoch 1)" in res.output
    assert f"move {out / 'last.pth'}, {out / 'checkpoint_0002.pth'} aside" in res.output
    assert snapshot(out) == before and leftovers(out) == []

    for name in ("last.pth", "checkpoint_0002.pth"):  # as advised
        (out / name).rename(tmp_path / name)
    res = run(["train", "--out", str(out), "--resume", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert f"resumed from {out / 'checkpoint_0001.pth'}" in res.output and (out / "last.pth").read_bytes() == clean

    # A NaN last.pth beside a clean numbered copy of the same state: that copy is resumed, and last.pth rewritten.
    ckpt = load_file(out / "last.pth")
    poison(ckpt)
    torch.save(ckpt, out / "last.pth")
    res = run(["train", "--out", str(out), "--resume", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "holds non-finite values" in res.output and "passing over it for checkpoint_0001.pth" in res.output
    assert (out / "last.pth").read_bytes() == clean


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_3_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, sig):
    import mokd.trainer as trainer

    full = tmp_path / "full"
    assert run(tiny_args(full)).exit_code == 0
    real = trainer._check_finite

    def signal_at_step_4(losses, step, epoch):  # 3 steps an epoch: inside epoch 2
        if step == 4:
            os.kill(os.getpid(), sig)
        real(losses, step, epoch)

    cut = tmp_path / "cut"
    monkeypatch.setattr(trainer, "_check_finite", signal_at_step_4)
    res = run(tiny_args(cut))
    assert res.exit_code == 128 + sig, res.output
    assert f"stopped by {signal.Signals(sig).name}: saved {cut / 'last.pth'} (step 5, batch 2 of 3 in epoch 2)" \
        in res.output
    assert f"mokd train --out {cut} --resume" in res.output
    ckpt = load_file(cut / "last.pth")
    assert ckpt["step"] == 5 and ckpt["partial_epoch"]["batches"] == 2 and leftovers(cut) == []
    assert signal.getsignal(sig) is signal.default_int_handler or signal.getsignal(sig) == signal.SIG_DFL
    monkeypatch.setattr(trainer, "_check_finite", real)

    res = run(["train", "--out", str(cut), "--resume"])
    assert res.exit_code == 0, res.output
    assert "step 5, batch 2 of 3 in epoch 2" in res.output
    a, b = load_file(full / "last.pth"), load_file(cut / "last.pth")
    assert a["epoch"] == b["epoch"] == 2 and "partial_epoch" not in b
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for n in ("net1", "net2"):
        for i, slots in a["optimizer"][n]["state"].items():
            for slot, v in slots.items():
                assert torch.equal(v, b["optimizer"][n]["state"][i][slot]), (n, i, slot)
    assert read_log(full / "log.jsonl") == read_log(cut / "log.jsonl")


def test_4_io_failures_are_one_line(tmp_path, monkeypatch):
    import mokd.checkpoint as checkpoint
    import mokd.runlog as runlog
    import mokd.trainer as trainer

    # Disk full while torch.save writes (it reports no errno, and its words vary: here "unexpected pos", which
    # has no "write" in it): the previous file stays, no temp file remains.
    real_save = torch.save

    def full_disk(obj, f):
        open(f, "wb").write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**19, 2**19))
    out = tmp_path / "full"
    res = run(tiny_args(out) + ["--epochs", "1"])
    assert res.exit_code != 0, res.output
    assert "no space left on /" in res.output and "writing last.pth, needed about" in res.output
    assert "MB, 0 MB free" in res.output and "Traceback" not in res.output
    assert not (out / "last.pth").exists() and leftovers(out) == []
    monkeypatch.setattr(torch, "save", real_save)

    # The log's append hits ENOSPC (a real errno) before any checkpoint.
    def enospc(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlog.RunLog, "write", enospc)
    res = run(tiny_args(tmp_path / "log_full") + ["--epochs", "1"])
    assert res.exit_code != 0 and "no space left on" in res.output and "log.jsonl" in res.output
    monkeypatch.undo()

    # An --out that cannot be a folder is refused before any data or model is built.
    def not_reached(*a, **k):
        raise AssertionError("built the data before checking --out")

    monkeypatch.setattr(trainer, "build_loader", not_reached)
    (tmp_path / "a_file").write_text("")
    res = run(tiny_args(tmp_path / "a_file" / "run"))
    assert res.exit_code != 0 and f"cannot write to --out {tmp_path / 'a_file' / 'run'}" in res.output
    res = run(tiny_args(tmp_path / "a_file"))
    assert res.exit_code != 0 and "is a file" in res.output
    monkeypatch.undo()
    res = run(tiny_args(tmp_path / "r") + ["--data", str(tmp_path / "a_file")])
    assert res.exit_code != 0 and "is a file, not a folder" in res.output and "ROOT/train/<class>" in res.output
    for bad, msg in [("net1.lr=-0.1", "net1.lr must be >= 0"), ("data.num_workers=-1", "data.num_workers must be >= 0"),
                     ("net2.weight_decay=.nan", "net2.weight_decay must be >= 0"),
                     ("augment.global_scale=[0.5, 0.2]", "augment.global_scale must be a pair"),
                     ("loss.student_temp=0", "loss.student_temp must be > 0")]:
        res = run(tiny_args(tmp_path / "r", bad))
        assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output, (bad, res.output)
    assert list((tmp_path / "r").iterdir()) == []  # the failed starts left nothing behind, no lock either


@pytest.mark.parametrize("error, free", [
    (OSError(errno.ENOSPC, "No space left on device"), None),  # the real errno, any free space reported
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054"), 2**19),
    (RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/7: "
                  "file write failed"), 2**19),
    (RuntimeError("words torch has not used yet"), 2**19),
])
def test_4_b_a_full_disk_is_one_line_whatever_torch_says(tmp_path, monkeypatch, error, free):
    import mokd.checkpoint as checkpoint
    from mokd.checkpoint import save_atomic
    from mokd.errors import UserError

    def full_disk(obj, f):
        open(f, "wb").write(b"x" * 1000)
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    if free is not None:
        monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                            lambda p: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    (tmp_path / "last.pth").write_bytes(b"the previous checkpoint")
    with pytest.raises(UserError) as e:
        save_atomic({"w": torch.zeros(1000)}, tmp_path / "last.pth")
    msg = str(e.value)
    assert msg.startswith("no space left on ") and "writing last.pth, needed about 1 MB" in msg and "\n" not in msg
    assert (tmp_path / "last.pth").read_bytes() == b"the previous checkpoint" and leftovers(tmp_path) == []


def test_4_c_a_failed_save_with_room_to_spare_is_not_called_a_full_disk(tmp_path, monkeypatch):
    from mokd.checkpoint import save_atomic

    def broken(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space here: torch's own error stands
        save_atomic({"w": torch.zeros(10)}, tmp_path / "last.pth")
    assert leftovers(tmp_path) == [] and not (tmp_path / "last.pth").exists()


def image_folder(root, n_per_class=8, sixteen_bit=False, with_val=True):
    rng = np.random.default_rng(0)
    for split in ("train", "val") if with_val else ("train",):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                v8 = rng.integers(0, 256, (32, 32), dtype=np.uint16)
                img = Image.fromarray(v8 * 257) if sixteen_bit else Image.fromarray(v8.astype(np.uint8))
                img.save(root / split / c / f"{c}{i}.png")
    return root


def test_5_images_as_they_come(tmp_path):
    from mokd.data import build_dataset, parse_data_spec

    eight, sixteen = image_folder(tmp_path / "eight"), image_folder(tmp_path / "sixteen", sixteen_bit=True)
    assert Image.open(sixteen / "train" / "a" / "a0.png").mode == "I;16"
    a, b = (build_dataset(parse_data_spec(str(r)), "train") for r in (eight, sixteen))
    for i in range(len(a)):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])), a.paths[i]
    assert np.asarray(b[0][0]).std() > 30  # grey levels, not clipped to black and white

    bad = eight / "train" / "b" / "b3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    (eight / "train" / "a" / "notes.jpg").write_text("not an image")
    args = tiny_args(tmp_path / "r", "data.subset=0") + ["--data", str(eight), "--epochs", "1", "--batch-size", "8"]
    res = run(args)
    assert res.exit_code != 0 and "cannot read image " in res.output and "--skip-bad-images" in res.output
    assert ("notes.jpg" in res.output or "b3.png" in res.output) and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) <= 3
    assert (tmp_path / "r" / "config.yaml").exists()  # the failed start wrote its config, and no step
    res = run(args + ["--skip-bad-images"])  # the rerun its message advises, into the same --out
    assert res.exit_code == 0, res.output
    assert "already holds a run" not in res.output and "left by a start that trained no step" in res.output
    assert "left out 2 unreadable image file(s)" in res.output
    records = [json.loads(ln) for ln in open(tmp_path / "r" / "log.jsonl")]
    data = [r for r in records if r["type"] == "data"]
    assert data[0]["skipped_images"] == 2 and sorted(os.path.basename(f) for f in data[0]["skipped_files"]) == \
        ["b3.png", "notes.jpg"]
    assert load_file(tmp_path / "r" / "last.pth")["metrics"]["skipped_images"] == 2

    shutil.rmtree(sixteen / "val" / "b")  # the online k-NN monitor needs the same classes in train and val
    res = run(tiny_args(tmp_path / "k", "data.subset=0", "train.knn_every=1") + ["--data", str(sixteen)])
    assert res.exit_code != 0 and "train and val have different classes" in res.output


class Gadget:
    pass


def test_7_messages_that_protect(finished, tmp_path):
    from mokd.errors import UserError

    torch.save({"model": {"w": torch.zeros(2)}, "extra": Gadget()}, tmp_path / "gadget.pth")
    with pytest.raises(UserError) as e:
        load_file(tmp_path / "gadget.pth")
    msg = str(e.value)
    assert "refused to load" in msg and "tests.test_faults.Gadget" in msg and "would run code" in msg
    assert "weights_only=False" not in msg

    out = copy_run(finished, tmp_path)
    (out / "checkpoint_0001.pth").unlink()
    ckpt = load_file(out / "last.pth")
    for k in [k for k in ckpt["model"] if k.startswith("teacher.net2.thead.")]:
        del ckpt["model"][k]
    torch.save(ckpt, out / "last.pth")
    res = run(["train", "--out", str(out), "--resume", "--epochs", "2"])
    assert res.exit_code != 0 and "last.pth is damaged" in res.output and "teacher.net2.thead." in res.output
    assert "does not fit" not in res.output and "--overwrite" in res.output
    assert load_file(out / "last.pth")["epoch"] == 1  # left as it was


def test_7_b_random_bytes_are_not_a_checkpoint_not_code(tmp_path):
    from mokd.errors import UserError

    rng = np.random.default_rng(0)
    for i in range(8):
        path = tmp_path / f"random{i}.pth"
        path.write_bytes(rng.bytes(4096))
        with pytest.raises(UserError) as e:
            load_file(path)
        msg = str(e.value)
        assert msg.startswith(f"{path} is not a checkpoint (unreadable: "), msg
        assert "pickled" not in msg and "code" not in msg and "\n" not in msg
    res = run(["eval", "knn", str(tmp_path / "random0.pth")])
    assert res.exit_code != 0 and "random0.pth is not a checkpoint (unreadable: " in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("sig, says, never", [(signal.SIGTERM, "a second SIGTERM changes nothing", "Ctrl-C"),
                                              (signal.SIGUSR1, "SIGKILL stops at once", "Ctrl-C"),
                                              (signal.SIGINT, "Ctrl-C again stops at once", "SIGKILL")])
def test_7_c_the_stop_message_fits_the_signal_received(capsys, sig, says, never):
    from mokd.preemption import StopRequest

    stop = StopRequest()
    stop._handle(sig, None)
    err = capsys.readouterr().err
    assert f"caught {signal.Signals(sig).name}: saving a checkpoint after this step" in err
    assert says in err and never not in err and stop.signum == sig


def test_7_d_messages_keep_a_relative_paths_case(finished, tmp_path, monkeypatch, user_errors_keep_path_case):
    import mokd.trainer as trainer
    from tests.conftest import case_changed_paths

    shutil.copytree(finished, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    assert case_changed_paths("cannot read Out/last.pth.") == ["Out/last.pth"]  # the check can fail
    assert case_changed_paths("cannot read out/last.pth.") == []

    def blows_up(losses, step, epoch):  # the first step after the resume
        raise trainer.NonFiniteLoss(f"non-finite loss sm1 at step {step} (epoch {epoch + 1}); stopping")

    monkeypatch.setattr(trainer, "_check_finite", blows_up)
    res = run(["train", "--out", "out", "--resume", "--epochs", "2"])
    assert res.exit_code != 0
    assert "not saved: out/last.pth (after epoch 1) is untouched. Lower the learning rate" in res.output
    assert case_changed_paths(res.output) == [] and user_errors_keep_path_case == []


def test_7_e_no_message_of_the_trainer_or_loader_changes_letter_case():
    """Every UserError raise in the trainer, its run folder and checkpoint code and the eval loader: no call
    that changes case (upper, lower, capitalize, title) builds its message, where it would meet a path."""
    import ast
    import inspect

    import mokd.checkpoint
    import mokd.rundir
    import mokd.trainer
    import mokd_eval.architecture
    import mokd_eval.formats
    import mokd_eval.loader

    errors = {"UserError", "UnusableCheckpoint", "NonFiniteCheckpoint", "NonFiniteLoss"}
    raises = 0
    for module in (mokd.trainer, mokd.rundir, mokd.checkpoint, mokd_eval.loader, mokd_eval.formats,
                   mokd_eval.architecture):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            func = node.exc.func
            if getattr(func, "id", getattr(func, "attr", None)) not in errors:
                continue
            raises += 1
            for inner in ast.walk(node.exc):
                if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute):
                    assert inner.func.attr not in ("upper", "lower", "capitalize", "title", "swapcase"), \
                        f"{module.__name__} line {node.lineno}: {ast.unparse(node.exc)[:120]}"
    assert raises > 40  # the walk found the raises


def _children(pid):
    try:
        return open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return []


@pytest.mark.slow
def test_2_d_kill_9_with_loader_workers_then_an_immediate_resume_five_times(tmp_path):
    """The issue's fault: a run killed with kill -9 while its 2 loader workers live, resumed at once. The
    workers (orphaned for a few seconds) must not hold the run's lock: every one of 5 resumes starts."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "mokd", *tiny_args(out, "data.subset=16", "data.num_workers=2", "optim.epochs=8"),
            "--device", "cpu", "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    step = -1
    for attempt in range(5):
        log = open(tmp_path / f"out{attempt}.txt", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:  # the first checkpoint this start writes
                try:
                    if load_file(out / "last.pth")["step"] > step:
                        break
                except Exception:  # not there yet (the atomic rename makes it whole when it is)
                    pass
                time.sleep(0.05)
            assert proc.poll() is None, (tmp_path / f"out{attempt}.txt").read_text()
            while time.monotonic() < deadline and not _children(proc.pid):  # the next epoch's workers
                time.sleep(0.01)
            assert _children(proc.pid), "no loader workers to orphan"
        finally:
            proc.kill()  # SIGKILL: no handler runs, the workers are orphaned
            proc.wait()
            log.close()
        text = (tmp_path / f"out{attempt}.txt").read_text()
        assert "in use by another mokd train" not in text, text
        if attempt:
            assert "resumed from" in text and "took over a stale lock" in text, text
        step = load_file(out / "last.pth")["step"]
    assert step >= 4
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout + res.stderr
    assert load_file(out / "last.pth")["epoch"] == 8 and leftovers(out) == []


@pytest.mark.slow
def test_2_e_resume_from_rolls_back_and_a_later_resume_keeps_to_it(tmp_path):
    """docs/monitoring.md's rollback: copying an old checkpoint over last.pth is undone by --resume (it takes
    the newer numbered ones); --resume-from moves them aside, and every later --resume continues from it."""
    out = tmp_path / "run"
    res = run(tiny_args(out, "data.subset=16", "train.save_every=1") + ["--epochs", "3"])
    assert res.exit_code == 0, res.output
    first = load_file(out / "checkpoint_0001.pth")
    res = run(["train", "--out", str(out), "--resume-from", str(out / "checkpoint_0001.pth"), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert f"rolled {out} back to {out / 'checkpoint_0001.pth'} (after epoch 1); moved checkpoint_0003.pth, " \
           f"checkpoint_0002.pth, last.pth to {out}/rolled-back-" in res.output
    aside = next(out.glob("rolled-back-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint_0002.pth", "checkpoint_0003.pth", "last.pth"]
    assert load_file(aside / "last.pth")["epoch"] == 3
    rolled = load_file(out / "last.pth")
    assert rolled["epoch"] == 1 and all(torch.equal(v, rolled["model"][k]) for k, v in first["model"].items())
    # A plain --resume now continues the rolled-back run: from epoch 1, not from the abandoned epoch 3.
    res = run(["train", "--out", str(out), "--resume", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert f"resumed from {out / 'last.pth'} (after epoch 1)" in res.output
    assert load_file(out / "last.pth")["epoch"] == 2
    steps = [json.loads(ln)["step"] for ln in open(out / "log.jsonl") if '"type": "step"' in ln]
    assert steps == sorted(steps) and max(steps) == 1  # the abandoned epoch 3's records are gone
    res = run(["train", "--out", str(out), "--resume-from", str(out / "last.pth"), "--overwrite"])
    assert res.exit_code != 0 and "give one of them" in res.output
