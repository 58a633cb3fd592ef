"""Fine-tuning onto a new element: a devset model fine-tuned on an Al set against the same model trained from scratch.

1. ``matsciml devset build --metals Al --structures N --out OUT/al``: a small S2EF EMT set of Al slabs with
   H/C/N/O adsorbates (docs/data.md); Al is absent from the S2EF devset's train split.
2. (a) **parent**: EGNN on the S2EF devset (``configs/devset/s2ef-egnn.yaml``) for ``--parent-steps`` steps.
3. (b) **finetune**: the same config on the Al set, started from the parent's ``checkpoints/last.ckpt``
   (``--model.init_args.init_from=...``), and (c) **scratch**: the same config on the Al set from random
   weights; (b) and (c) for ``--steps`` steps each, with every seed of ``--seeds``.
4. Every run validates once, after its last step; its validation force MAE (eV/Å) is that ``val/force_mae``
   in its ``metrics.csv``. The table and ``OUT/results.json`` hold it per run, and the mean over seeds per arm.

Every run is a ``matsciml fit`` in its own process, pinned to ``OUT/runs/<arm>/seed<S>`` (``--overwrite``; a
completed parent of the same steps is reused). A seed sets both the initialisation and the training shuffle,
so it varies a fine-tune that loads every weight too.
Its step record names its data by digest, and (b)'s names its parent (``matsciml runs show``, docs/runs.md).
(b) needs the task's ``init_from``; where the installed matsciml lacks it, (b) is skipped with a note.

Usage::

    python experiments/finetune_new_element.py --steps 300 --out experiments/out/finetune-al
    python experiments/finetune_new_element.py --steps 300 --parent-steps 1000 --seeds 0 1 2 --structures 120
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "devset" / "s2ef-egnn.yaml"
METRIC = "val/force_mae"


def has_init_from() -> bool:
    """Whether the installed tasks take ``init_from`` (issue 14's fine-tuning)."""
    from matsciml.tasks import S2EFTask

    return "init_from" in inspect.signature(S2EFTask.__init__).parameters


def fit_command(out: Path, arm: str, seed: int, steps: int, data: Path | None, init_from: Path | None) -> list[str]:
    """``matsciml fit`` of the EGNN devset config: ``steps`` steps, in ``out/runs/<arm>/seed<seed>``."""
    command = [
        sys.executable, "-m", "matsciml", "fit", "--config", str(CONFIG),
        f"--seed_everything={seed}",  # the weights' initialisation (the new ones only, in a fine-tune)
        f"--data.init_args.seed={seed}",  # the training shuffle: also varies a fine-tune that loads every weight
        f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1",
        # validate once, after the last step (also mid-epoch): every arm is scored at the same point
        f"--trainer.val_check_interval={steps}", "--trainer.check_val_every_n_epoch=null",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        f"--trainer.logger.init_args.name={arm}",
        f"--trainer.logger.init_args.version=seed{seed}",
        "--overwrite=true",
    ]  # fmt: skip
    if data is not None:  # the Al set instead of the devset's splits
        command += [f"--data.init_args.{split}_path={data / name}" for split, name in _DATA_SPLITS]
    if init_from is not None:
        command.append(f"--model.init_args.init_from={init_from}")
    return command


_DATA_SPLITS = (("train", "train"), ("val", "val"), ("test", "test"), ("predict", "test"))


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / arm / f"seed{seed}"


def completed(folder: Path, steps: int) -> bool:
    """Whether ``folder`` holds a completed fit of ``steps`` steps (a parent to reuse)."""
    from matsciml.records.provenance import load_record

    record_file = folder / "step.json"
    if not (record_file.is_file() and (folder / "checkpoints" / "last.ckpt").is_file()):
        return False
    record = load_record(record_file)
    return record["status"] == "COMPLETED" and record["config"]["trainer"]["max_steps"] == steps


def last_value(metrics_csv: Path, column: str = METRIC) -> float | None:
    """The last logged value of ``column`` in a Lightning ``metrics.csv`` (``None`` if never logged)."""
    value = None
    with open(metrics_csv, newline="") as file:
        for row in csv.DictReader(file):
            if row.get(column) not in (None, ""):
                value = float(row[column])
    return value if value is None or math.isfinite(value) else None


def run(command: list[str], log: Path) -> None:
    """Run ``command`` with its output in ``log``; a failure stops the experiment, naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stream:
        done = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n  see {log}")


def summary(results: list[dict]) -> dict[str, dict]:
    """Mean and spread of the metric over seeds, per arm."""
    arms: dict[str, list[float]] = {}
    for result in results:
        if result[METRIC] is not None:
            arms.setdefault(result["arm"], []).append(result[METRIC])
    return {
        arm: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
        for arm, v in arms.items()
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of (b) and (c) (default: 300)")
    parser.add_argument("--parent-steps", type=int, help="training steps of the parent (default: --steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of (b) and (c) (default: 0)")
    parser.add_argument("--structures", type=int, default=60, help="frames of the Al set, split 3:1:1 (default: 60)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "out" / "finetune-al")
    args = parser.parse_args(argv)
    if args.steps < 1 or (args.parent_steps is not None and args.parent_steps < 1):
        parser.error("--steps and --parent-steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    out = args.out.resolve()
    data = out / "al"
    if not data.exists():  # deterministic from its seed: an existing set is the same one
        run(
            [sys.executable, "-m", "matsciml", "devset", "build", "--metals", "Al"]
            + ["--structures", str(args.structures), "--out", str(data)],
            out / "logs" / "al.log",
        )
    parent_steps = args.parent_steps or args.steps
    if not completed(run_dir(out, "parent", 0), parent_steps):  # a rerun with other seeds keeps the parent
        run(fit_command(out, "parent", 0, parent_steps, None, None), out / "logs" / "parent.log")
    parent = run_dir(out, "parent", 0) / "checkpoints" / "last.ckpt"
    results = [{"arm": "parent", "seed": 0, "steps": parent_steps, "data": "devsets/s2ef"}]
    finetune = has_init_from()
    for seed in args.seeds:
        arms = [("finetune", parent)] if finetune else []
        for arm, init_from in [*arms, ("scratch", None)]:
            run(fit_command(out, arm, seed, args.steps, data, init_from), out / "logs" / f"{arm}-seed{seed}.log")
            results.append({"arm": arm, "seed": seed, "steps": args.steps, "data": str(data)})
    for result in results:
        folder = run_dir(out, result["arm"], result["seed"])
        result.update(run=str(folder), **{METRIC: last_value(folder / "metrics.csv")})
    report = {"metric": f"{METRIC} (eV/Å), last validation", "results": results, "summary": summary(results)}
    if not finetune:
        report["note"] = "(b) skipped: this matsciml's tasks take no init_from (issue 14's fine-tuning)"
    from matsciml.atomic import write_file

    write_file(out / "results.json", (json.dumps(report, indent=1) + "\n").encode())
    print(f"{'arm':10s} {'seed':>4s} {'steps':>6s} {METRIC + ' (eV/Å)':>22s}  data")
    for result in results:
        value = "-" if result[METRIC] is None else f"{result[METRIC]:.4f}"
        print(f"{result['arm']:10s} {result['seed']:>4d} {result['steps']:>6d} {value:>22s}  {result['data']}")
    for arm, stats in report["summary"].items():
        print(f"{arm}: {stats['mean']:.4f} ± {stats['std']:.4f} eV/Å over {stats['n']} seed(s)")
    if "note" in report:
        print(report["note"])
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
