"""Data-parallel scaling: epoch time of EGNN S2EF training against the number of DDP processes.

The analogue of the paper's Figure 3 (speed-up of an epoch when adding GPUs, which flattens on one
node). Here: a synthetic OC20-sized S2EF set (``matsciml.data.synthetic.write_synthetic``, the same as
``matsciml devset synthetic``; 48-104 atoms per structure), cached under ``--data`` and reused, trained
with EGNN in ``S2EFTask`` (forces by autograd) on a 6 Å radius graph, ``--batch-size`` structures per
process. For every process count N a fresh Python process runs a Lightning ``Trainer(devices=N,
strategy="ddp" if N > 1)`` with no validation, logger or checkpoints; Lightning's DDP launcher starts
the other ranks by re-running this script with the same arguments (``--worker ...``). Each run's
epoch time is measured by :class:`~matsciml.tasks.timing.EpochTimer` on rank 0: the first epoch is
warm-up, the figure is the median of the later ones. Throughput = training structures / epoch time
(every structure is seen once per epoch; the atom-balanced DDP sampler tops up the last step with at
most N - 1 repeats). The global batch grows with N (weak scaling per step, strong scaling per epoch).

On CPU each process gets ``cores // N`` intra-op threads (``--threads`` overrides; set through
``OMP_NUM_THREADS``, which Lightning would otherwise choose itself), so all runs use the same cores and
the speed-up measures how well work splits between processes rather than added hardware. On a shared
machine, two threads in one process stall when another job competes for the cores (one-process epochs
of 6 s grew to 50-85 s on the 2-vCPU VM while tests ran); ``--threads 1`` then compares processes at one
thread each, so the speed-up counts the added cores. Loader workers default to 0 on CPU: building the
graphs costs ~1 ms per structure (docs/benchmarks.md) against ~15-20 ms of training, and a worker would
take a core from training. The DDP ranks stay on one node (launcher variables such as SLURM's are
cleared for the runs).
``--accelerator gpu --processes 1 2 4 8`` runs one process per GPU (NCCL); that path is written for GPU
machines but has NOT been run here (the development VM has 2 CPU cores and no GPU).

Usage::

    python experiments/scaling.py --quick                     # 1,000 structures, 2 epochs (~2-3 min)
    python experiments/scaling.py                             # 10,000 structures, ~10-15 min on 2 vCPUs
    python experiments/scaling.py --accelerator gpu --processes 1 2 4 8 --json scaling.json --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "experiments" / ".cache"
LAUNCHER_VARIABLES = ("SLURM_", "MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC", "PL_")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def ensure_dataset(path: Path, num: int) -> None:
    """Write the synthetic set once; later runs reuse it."""
    if path.exists():
        return
    from matsciml.data.synthetic import write_synthetic

    print(f"writing {num:,} synthetic S2EF structures to {path} (once) ...", flush=True)
    start = time.perf_counter()
    write_synthetic(path, num_structures=num, task="s2ef", seed=0)
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


# -- the worker: one Trainer.fit, launched fresh per process count -------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from matsciml.data.datamodules import S2EFDataModule
    from matsciml.models import EGNN
    from matsciml.tasks import S2EFTask
    from matsciml.tasks.timing import EpochTimer

    pl.seed_everything(0, verbose=False)
    data = S2EFDataModule(
        train_path=args.data,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        cutoff=6.0,
        representation="graph",
    )
    task = S2EFTask(EGNN(cutoff=6.0), lr=1e-3, statistics=data.target_statistics, species=data.species)
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(task, datamodule=data)
    if trainer.global_rank == 0:
        result = {
            "epoch_times": timer.epoch_times,
            "structures": len(data.datasets["train"]),
            "steps": trainer.num_training_batches,
            "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in task.parameters()),
        }
        Path(args.result).write_text(json.dumps(result))


def run_one(args: argparse.Namespace, devices: int, threads: int, workers: int) -> dict:
    """One fresh ``--worker`` process (which launches the other DDP ranks itself)."""
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "--devices",
            str(devices),
            "--result",
            str(result),
            "--data",
            str(args.data),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--num-workers",
            str(workers),
            "--accelerator",
            args.accelerator,
            "--threads",
            str(threads),
        ]
        # a launcher's variables (SLURM, torchrun) would make Lightning wait for ranks nobody starts
        env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}
        # Lightning sets OMP_NUM_THREADS to cores // N for DDP ranks unless it is set: set it ourselves
        env.update({"OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"})
        with open(log, "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        if code != 0 or not result.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            sys.exit(f"run with {devices} process(es) failed (exit {code}):\n{tail}")
        return json.loads(result.read_text())


def table(rows: list[dict], markdown: bool) -> str:
    head = ["processes", "threads/process", "global batch", "epoch time (s)", "structures/s", "speed-up", "efficiency"]
    cells = [
        [
            str(r["processes"]),
            str(r["threads"]),
            str(r["global_batch"]),
            f"{r['epoch_s']:.1f}",
            f"{r['throughput']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['efficiency']:.0%}",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[k]) for c in cells)) for k, h in enumerate(head)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True)) for line in [head, *cells])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num", type=positive, default=10_000, help="synthetic structures (default 10,000)")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="dataset directory, written with NUM structures if "
        "missing, else used as it is (default experiments/.cache/synthetic-s2ef-NUM)",
    )
    parser.add_argument("--epochs", type=positive, default=2, help="epochs per run, >= 2: the first is warm-up")
    parser.add_argument("--batch-size", type=positive, default=8, help="structures per batch and process")
    parser.add_argument(
        "--processes",
        type=positive,
        nargs="+",
        default=None,
        help="process counts (default: 1 2 on CPU, 1 2 4 8 on GPU)",
    )
    parser.add_argument("--threads", type=positive, default=None, help="torch threads per process (default cores // N)")
    parser.add_argument(
        "--num-workers",
        type=int,
        choices=range(0, 65),
        metavar="W",
        default=None,
        help="DataLoader workers per process (default 0 on CPU, where they compete with training "
        "for the cores; on GPU min(4, cores // N - 1))",
    )
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="1,000 structures, 2 epochs")
    parser.add_argument("--json", type=Path, default=None, help="also save the results here")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    # the worker's own arguments (not for users)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if args.quick:
        args.num, args.epochs = 1_000, 2
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is warm-up)")
    processes = args.processes or ([1, 2] if args.accelerator == "cpu" else [1, 2, 4, 8])
    args.data = (args.data or CACHE / f"synthetic-s2ef-{args.num}").resolve()
    ensure_dataset(args.data, args.num)
    print(
        f"{args.accelerator}, {cores()} cores, batch {args.batch_size}/process, {args.epochs} epochs, data {args.data}",
        flush=True,
    )

    rows: list[dict] = []
    for n in processes:
        threads = args.threads or max(1, cores() // n)
        workers = (
            args.num_workers
            if args.num_workers is not None
            else 0
            if args.accelerator == "cpu"
            else min(4, max(1, cores() // n - 1))
        )
        print(f"running {n} process(es) x {threads} thread(s), {workers} loader worker(s) each ...", flush=True)
        start = time.perf_counter()
        res = run_one(args, n, threads, workers)
        epoch_s = statistics.median(res["epoch_times"][1:])
        rows.append(
            {
                "processes": n,
                "threads": threads,
                "loader_workers": workers,
                "global_batch": n * args.batch_size,
                "epoch_s": epoch_s,
                "throughput": res["structures"] / epoch_s,
                "steps_per_epoch": res["steps"],
                "epoch_times": res["epoch_times"],
                "structures": res["structures"],
                "params": res["params"],
            }
        )
        print(
            f"  epochs {', '.join(f'{t:.1f}' for t in res['epoch_times'])} s; "
            f"{res['steps']} steps/epoch; run {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    base = min(rows, key=lambda r: r["processes"])
    for r in rows:  # relative to the fewest processes run (taken as perfectly efficient when more than one)
        r["speedup"] = base["epoch_s"] / r["epoch_s"] * base["processes"]
        r["efficiency"] = r["speedup"] / r["processes"]
    print(
        f"\nEGNN S2EF ({rows[0]['params']:,} parameters), {rows[0]['structures']:,} structures; "
        "epoch time = median of epochs after the first"
    )
    print(table(rows, args.markdown))
    if args.json:
        settings = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "devices", "result", "json", "markdown")
        }
        settings["processes"] = processes
        args.json.write_text(json.dumps({"settings": settings, "cores": cores(), "runs": rows}, indent=2))
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
