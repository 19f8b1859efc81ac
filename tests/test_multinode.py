"""Multi-node training, tested on one machine: two torchrun agents (two "nodes" of one process each) meet by
c10d rendezvous on 127.0.0.1 and train the tiny pair over gloo; they end where one node of 2 processes does."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from mokd.checkpoint import load_file
from tests.tiny import TINY_OVERRIDES, assert_same_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_by_c10d_rendezvous_equal_one_node_of_two_processes(tmp_path):
    common = [a for o in [*TINY_OVERRIDES, "data.subset=32"] for a in ("--set", o)] + [
        "--epochs", "1", "--device", "cpu", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = [sys.executable, "-m", "torch.distributed.run"]
    single = subprocess.run([*run, "--standalone", "--nproc_per_node=2", "-m", "mokd", "train", *common,
                             "--out", str(tmp_path / "single")], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    # What examples/slurm/train_multinode.sbatch runs on each node, with both "nodes" on this machine: the
    # agent that binds the port hosts the rendezvous store, the other joins it as a client.
    port = free_port()
    node = [*run, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=mokd-test", "-m", "mokd", "train", *common,
            "--out", str(tmp_path / "multi")]
    agents = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = []
    try:
        for a in agents:
            outputs.append(a.communicate(timeout=600)[0])
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sum("2 process(es)" in o for o in outputs) == 1  # rank 0 speaks, on one of the nodes

    # the same ranks, data shards and all-reduces: equal up to float rounding
    assert_same_run(tmp_path / "single", tmp_path / "multi", atol=1e-6, rtol=1e-5, log_rtol=1e-5, step=2)


@pytest.mark.slow
def test_two_processes_accumulating_equal_one_process_on_whole_batches(tmp_path):
    """DDP with optim.accum_steps=2 (no_sync in the first micro-batch, one all-reduce in the second) ends where
    one process with whole batches does; two ViTs (no batch norm) and SGD, as tests/test_accum.py."""
    common = [a for o in [*TINY_OVERRIDES, "data.subset=32", "net1.arch=test_vit",
                          "net1.kwargs={img_size: 32, patch_size: 8}", "net1.small_stem=false",
                          "net1.optimizer=sgd", "net2.optimizer=sgd"] for a in ("--set", o)] + [
        "--epochs", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one = subprocess.run([sys.executable, "-m", "mokd", "train", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mokd", "train", *common, "--set", "optim.accum_steps=2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "batch 16 = 2 process(es) x 2 accumulated micro-batches x 4" in two.stdout
    a, b = load_file(tmp_path / "one" / "last.pth"), load_file(tmp_path / "two" / "last.pth")
    assert a["step"] == b["step"] == 2
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5, rtol=1e-4), k
