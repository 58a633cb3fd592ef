"""Figures for docs/reliability.md that are not pass/fail tests: how fast a DDP job ends when a rank
is SIGKILLed, and whether a training process's memory stays flat.

Both run real ``matsciml fit`` processes on the S2EF devset::

    PYTHONPATH=$PWD:$PWD/tests .venv/bin/python experiments/fault_figures.py [--rss-seconds 45]

* ``rank-death``: 2-process CPU DDP (gloo); rank 1 SIGKILLs itself after step 3 (``KillAtStep``,
  whose marker file is written just before). Prints the seconds from that marker to the job's exit.
* ``rss``: one process trains for ``--rss-seconds``; its resident memory (with any children) is
  sampled every second. Prints the RSS after 10 s, at the end, and the slope of a least-squares line
  through the second half of the samples (MB per minute; a leak shows as a steady positive slope).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
MATSCIML = str(Path(sys.executable).with_name("matsciml"))


def _environment() -> dict[str, str]:
    with socket.socket() as probe:  # a free port for this job's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE"))}
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=pythonpath)
    return env


def _fit(save_dir: Path, *extra: str) -> list[str]:
    return [
        MATSCIML,
        "fit",
        "--config",
        "configs/devset/s2ef-egnn.yaml",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        *extra,
    ]


def rank_death(folder: Path) -> dict:
    marker = folder / "killed"
    kill = {"class_path": "helpers.interrupts.KillAtStep", "init_args": {"step": 3, "marker": str(marker), "rank": 1}}
    command = _fit(folder, "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.callbacks+={json.dumps(kill)}")
    proc = subprocess.run(command, cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=900)
    ended = time.time()
    if not marker.exists():
        raise RuntimeError(f"rank 1 was never killed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    seconds = round(ended - marker.stat().st_mtime, 2)
    return {"exit_code": proc.returncode, "seconds_to_exit": seconds, "last_line": last}


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def rss(folder: Path, seconds: int) -> dict:
    limit = f"--trainer.max_time=00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    quiet = subprocess.DEVNULL  # nothing read while it runs: a full pipe would stall it
    proc = subprocess.Popen(_fit(folder, limit), cwd=ROOT, env=_environment(), stdout=quiet, stderr=quiet)
    watched, samples, start = psutil.Process(proc.pid), [], time.monotonic()
    while proc.poll() is None:
        try:
            samples.append((time.monotonic() - start, _tree_rss(watched) / 2**20))
        except psutil.NoSuchProcess:
            break
        time.sleep(1.0)
    proc.wait()
    times, megabytes = np.array(samples).T
    second_half = times >= times[-1] / 2
    slope = np.polyfit(times[second_half], megabytes[second_half], 1)[0] * 60
    after_10 = megabytes[np.searchsorted(times, 10.0)]
    return {
        "exit_code": proc.returncode,
        "samples": len(samples),
        "rss_mb_after_10s": round(float(after_10), 1),
        "rss_mb_at_end": round(float(megabytes[-1]), 1),
        "rss_mb_peak": round(float(megabytes.max()), 1),
        "slope_mb_per_min_second_half": round(float(slope), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("rank-death", "rss"))
    parser.add_argument("--rss-seconds", type=int, default=45)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fault-figures-") as tmp:
        if args.only in (None, "rank-death"):
            print("rank-death:", json.dumps(rank_death(Path(tmp) / "ddp")), flush=True)
        if args.only in (None, "rss"):
            print("rss:", json.dumps(rss(Path(tmp) / "rss", args.rss_seconds)), flush=True)


if __name__ == "__main__":
    main()
