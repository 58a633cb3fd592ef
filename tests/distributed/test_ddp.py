"""Real multi-process DDP runs on CPU (gloo): Lightning-launched, fake SLURM nodes, torchrun, failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.training import quiet_trainer, tiny_egnn

from matsciml.data.datamodules import S2EFDataModule
from matsciml.tasks import S2EFTask

SCRIPT = Path(__file__).with_name("ddp_script.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 90  # seconds a run may take before the test fails (they take ~10-20 s)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("SLURM_", "MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC", "PL_")
        )
    }
    env.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **extra})
    return env


def run_all(commands: list[tuple[list[str], dict[str, str]]], timeout: float = TIMEOUT) -> list[int]:
    """Starts every command at once; kills them all (and fails) if they are not done in ``timeout``."""
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        for cmd, env in commands
    ]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the session holds the Lightning-launched children too
        pytest.fail(f"distributed run did not finish within {timeout} s")
    for proc, out in zip(procs, outputs, strict=True):
        proc.output = out
    return procs


def load_ranks(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def check_ranks(out: Path, world: int = 2) -> list[dict]:
    ranks = load_ranks(out, world)
    assert [r["world_size"] for r in ranks] == [world] * world
    assert len({r["hash"] for r in ranks}) == 1, "ranks ended with different weights"
    assert {r["train_sampler"] for r in ranks} == {"AtomBalancedBatchSampler"}
    assert {r["val_sampler"] for r in ranks} == {"UnpaddedDistributedSampler"}
    assert len({len(r["seen"]["train"]) for r in ranks}) == 1  # same number of steps on every rank
    val = [tuple(x) for r in ranks for x in r["seen"]["val"]]
    assert len(val) == len(set(val)) == 100  # the whole val devset, each structure once
    assert all(r["metrics"] == ranks[0]["metrics"] for r in ranks)
    predicted = [tuple(x) for r in ranks for x in r["seen"]["predict"]]
    assert len(predicted) == len(set(predicted)) == ranks[0]["predict_size"]  # predict: each structure once
    return ranks


def single_process_metrics(checkpoint: Path) -> dict[str, float]:
    datamodule = S2EFDataModule.from_devset(batch_size=3)
    datamodule.setup("fit")
    task = S2EFTask(tiny_egnn(), statistics=datamodule.target_statistics)
    task.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    return quiet_trainer().validate(task, datamodule=datamodule, verbose=False)[0]


def test_ddp_matches_single_process_evaluation(tmp_path):
    # 3 processes: 100 val structures do not split evenly, so a padding sampler would repeat 2 of them;
    # batches of 3 give the ranks different numbers of validation batches (12, 11, 11): no hang
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "--devices", "3", "--batch-size", "3"]
    (proc,) = run_all([(cmd, base_env())])
    assert proc.returncode == 0, proc.output[-3000:]
    ranks = check_ranks(tmp_path, world=3)
    assert [r["val_batches"] for r in ranks] == [12, 11, 11]
    reference = single_process_metrics(tmp_path / "model.ckpt")
    for name, value in ranks[0]["metrics"].items():
        if name == "val/loss":  # per-batch force means weighted by structures: depends on batch composition
            continue
        # exact, not 100/99 too high: tasks log float weights, since Lightning 2.6 truncates an integer
        # count when it averages it over ranks (fabric/utilities/distributed.py `_sync_ddp`)
        assert value == pytest.approx(reference[name], rel=1e-5, abs=1e-7), name


def test_training_epoch_metrics_are_weighted_means_over_ranks(tmp_path):
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "--devices", "2", "--train-batches", "3"]
    (proc,) = run_all([(cmd, base_env())])
    assert proc.returncode == 0, proc.output[-3000:]
    ranks = check_ranks(tmp_path)
    steps = [step for r in ranks for step in r["train_logged"]]
    assert {name for step in steps for name in step} >= {"loss", "energy_mae", "force_mae", "rank_probe"}
    local = [sum(v * w for v, w in (s["rank_probe"] for s in r["train_logged"])) for r in ranks]
    assert local[0] < 10 < 100 < local[1]  # the probe differs on the two ranks: an unreduced mean would show
    for name in {name for step in steps for name in step}:
        pairs = [step[name] for step in steps if name in step]
        expected = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        for r in ranks:  # every rank holds the same, global, epoch value
            assert r["train_epoch"][f"train/{name}_epoch"] == pytest.approx(expected, rel=1e-5), (name, r["rank"])


def test_ddp_trains_a_compiled_model(tmp_path):
    # energy-only: with a force loss, training steps run eagerly (torch.compile has no double backward)
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "--compile", "aot_eager", "--energy-only"]
    (proc,) = run_all([(cmd, base_env())])
    assert proc.returncode == 0, proc.output[-3000:]
    ranks = check_ranks(tmp_path)
    assert all(r["compiled"] for r in ranks)


def slurm_env(rank: int, port: str) -> dict[str, str]:
    return base_env(
        MASTER_PORT=port,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="matsciml-test",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="2",
        SLURM_PROCID=str(rank),
        SLURM_LOCALID="0",
        SLURM_NODEID=str(rank),
        SLURM_NODELIST="localhost",
    )


def test_two_fake_slurm_nodes_agree(tmp_path):
    port = str(free_port())
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "--devices", "1", "--num-nodes", "2"]
    procs = run_all([(cmd, slurm_env(rank, port)) for rank in range(2)])
    for proc in procs:
        assert proc.returncode == 0, proc.output[-3000:]
    check_ranks(tmp_path)


def test_torchrun_two_nodes_on_loopback_agree(tmp_path):
    port = str(free_port())
    commands = [
        (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(SCRIPT),
                str(tmp_path),
                "--devices",
                "1",
                "--num-nodes",
                "2",
            ],
            base_env(),
        )
        for rank in range(2)
    ]
    for proc in run_all(commands):
        assert proc.returncode == 0, proc.output[-3000:]
    check_ranks(tmp_path)


def test_a_failing_rank_ends_the_whole_job(tmp_path):
    start = time.monotonic()
    (proc,) = run_all(
        [([sys.executable, str(SCRIPT), str(tmp_path), "--devices", "2", "--fail-rank", "1"], base_env())], timeout=60
    )
    assert proc.returncode != 0
    assert "deliberate failure on rank 1" in proc.output
    assert time.monotonic() - start < 60
