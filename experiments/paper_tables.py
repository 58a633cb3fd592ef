"""The paper's Tables 1 and 2 on the shipped devsets: EGNN, MegNet and Gala on IS2RE and S2EF.

Every model x task trains its devset config (``configs/devset/{task}-{model}.yaml``) through the real
command line, ``matsciml fit --config ...``, in its own process with its own CSV log under ``--out``
and :class:`~matsciml.tasks.timing.EpochTimer` attached; the tables are then read back from each run's
``metrics.csv`` and checkpoint.

* **Table 1** (paper: parameters, GPUs, hours per epoch): parameters (trainable, of the model rebuilt
  from the checkpoint's ``model`` spec), processes (here 1 CPU process), batch size (from the config),
  epochs run, and the mean training epoch time in seconds (``time/train_epoch_s``, validation excluded;
  the first epoch is left out when there are two or more, it holds warm-up).
* **Table 2** (paper: train and validation-ID losses): the final epoch's training and validation errors
  in physical units: energy MAE (eV) for IS2RE; energy MAE (eV) and force MAE (eV/Å) for S2EF, next to
  the baselines the task logs (training-mean energy, zero forces).

Figures are devset-sized (about 200 structures per split, a few CPU minutes per model), so they show
the pipeline and relative costs, not the paper's accuracies. Default epochs (egnn=10, megnet=6, gala=3)
keep the whole script near 11-12 minutes on the 2-vCPU VM with one torch thread (per-epoch times from
docs/training.md); the configs' own epoch counts train longer.

Usage::

    python experiments/paper_tables.py                          # all six runs (~12 min on 2 vCPUs)
    python experiments/paper_tables.py --only egnn --epochs 2   # smoke test
    python experiments/paper_tables.py --epochs egnn=30 megnet=10 gala=5 --markdown
    python experiments/paper_tables.py --no-train --markdown    # re-read the runs in --out
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("egnn", "megnet", "gala")
TASKS = ("is2re", "s2ef")
DEFAULT_EPOCHS = {"egnn": 10, "megnet": 6, "gala": 3}


def parse_epochs(values: list[str]) -> dict[str, int]:
    """``["5"]`` (every model) or ``["egnn=10", "gala=3"]`` (per model, the rest keep the defaults)."""
    epochs = dict(DEFAULT_EPOCHS)
    for value in values:
        model, _, count = value.rpartition("=")
        if model and model not in MODELS:
            raise argparse.ArgumentTypeError(f"--epochs: unknown model {model!r} (choose from {', '.join(MODELS)})")
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"--epochs: {value!r} needs a positive integer")
        epochs.update({model: int(count)} if model else dict.fromkeys(MODELS, int(count)))
    return epochs


def latest_run(save_dir: Path) -> Path | None:
    """The newest ``lightning_logs/version_N`` under a run's save_dir."""
    versions = sorted(save_dir.glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[-1]))
    return versions[-1] if versions else None


def train(config: Path, save_dir: Path, epochs: int, threads: int) -> tuple[int, str]:
    """``matsciml fit`` in a fresh process; returns its exit code and output tail."""
    command = [
        sys.executable,
        "-m",
        "matsciml.cli.app",
        "fit",
        "--config",
        str(config),
        f"--trainer.max_epochs={epochs}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.callbacks+=matsciml.tasks.timing.EpochTimer",
        "--trainer.enable_progress_bar=false",
    ]
    save_dir.mkdir(parents=True, exist_ok=True)
    log = save_dir / "fit.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    return code, "\n".join(log.read_text(errors="replace").splitlines()[-30:])


def read_run(run: Path) -> dict:
    """Epoch times, final train/val metrics and parameter count of one finished run."""
    import torch

    from matsciml.models.base import AbstractEnergyModel

    with open(run / "metrics.csv") as file:
        rows = list(csv.DictReader(file))

    def last(column: str) -> float | None:
        values = [float(row[column]) for row in rows if row.get(column)]
        return values[-1] if values else None

    times = [float(row["time/train_epoch_s"]) for row in rows if row.get("time/train_epoch_s")]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model = AbstractEnergyModel.from_spec(checkpoint["hyper_parameters"]["model"])
    metrics = {
        name: last(column)
        for name, column in {
            "train_energy": "train/energy_mae_epoch",
            "train_force": "train/force_mae_epoch",
            "val_energy": "val/energy_mae",
            "val_force": "val/force_mae",
            "energy_baseline": "val/energy_mae_baseline",
            "force_baseline": "val/force_mae_baseline",
        }.items()
    }
    return {"times": times, "params": sum(p.numel() for p in model.parameters() if p.requires_grad), **metrics}


def render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        align = ["---" if k < 2 else "---:" for k in range(len(head))]
        return "\n".join("| " + " | ".join(line) + " |" for line in [head, align, *rows])
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(head)]
    return "\n".join(
        "  ".join(x.ljust(w) if k < 2 else x.rjust(w) for k, (x, w) in enumerate(zip(line, widths, strict=True)))
        for line in [head, *rows]
    )


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(results: dict[tuple[str, str], dict], markdown: bool) -> str:
    head1 = ["model", "task", "parameters", "processes", "batch size", "epochs", "mean epoch time (s)"]
    head2 = [
        "model",
        "task",
        "train energy MAE (eV)",
        "val energy MAE (eV)",
        "val energy baseline (eV)",
        "train force MAE (eV/Å)",
        "val force MAE (eV/Å)",
        "val force baseline (eV/Å)",
    ]
    rows1, rows2 = [], []
    for (model, task), r in results.items():
        times = r["times"][1:] if len(r["times"]) >= 2 else r["times"]
        mean = sum(times) / len(times) if times else None
        rows1.append(
            [model, task, f"{r['params']:,}", "1 (CPU)", str(r["batch_size"]), str(len(r["times"])), fmt(mean, 1)]
        )
        rows2.append(
            [
                model,
                task,
                fmt(r["train_energy"]),
                fmt(r["val_energy"]),
                fmt(r["energy_baseline"]),
                fmt(r["train_force"]),
                fmt(r["val_force"]),
                fmt(r["force_baseline"]),
            ]
        )
    return (
        f"Table 1 (cost)\n{render(head1, rows1, markdown)}\n\n"
        f"Table 2 (final-epoch errors; baselines: training-mean energy, zero forces)\n"
        f"{render(head2, rows2, markdown)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS), help="models to run")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to run")
    parser.add_argument(
        "--epochs",
        nargs="+",
        default=[],
        metavar="[MODEL=]N",
        help="epochs for every model (N) or per model (egnn=10 megnet=6 gala=3, the defaults)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "experiments" / "out" / "paper_tables",
        help="one save_dir per run below this folder",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (OMP_NUM_THREADS; default 1, as docs/training.md measured)",
    )
    parser.add_argument("--no-train", action="store_true", help="only read the newest runs already in --out")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = parser.parse_args()
    try:
        epochs = parse_epochs(args.epochs)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))

    runs = [(model, task) for model in args.only for task in args.tasks]
    results: dict[tuple[str, str], dict] = {}
    failed = []
    for k, (model, task) in enumerate(runs, 1):
        config = ROOT / "configs" / "devset" / f"{task}-{model}.yaml"
        save_dir = (args.out / f"{task}-{model}").resolve()
        if not args.no_train:
            print(f"[{k}/{len(runs)}] {model} {task}: {epochs[model]} epoch(s), log {save_dir / 'fit.log'}", flush=True)
            start = time.perf_counter()
            code, tail = train(config, save_dir, epochs[model], args.threads)
            if code != 0:
                print(f"  FAILED (exit {code}):\n{tail}", file=sys.stderr, flush=True)
                failed.append(f"{model} {task}")
                continue
            print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
        run = latest_run(save_dir)
        if run is None:
            print(f"  {model} {task}: no run in {save_dir}", file=sys.stderr)
            failed.append(f"{model} {task}")
            continue
        batch_size = yaml.safe_load(config.read_text())["data"]["init_args"]["batch_size"]
        results[(model, task)] = {**read_run(run), "batch_size": batch_size}

    if results:
        print(f"\ndevsets, 1 CPU process, {args.threads} torch thread(s); run folders under {args.out}\n")
        print(tables(results, args.markdown))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
