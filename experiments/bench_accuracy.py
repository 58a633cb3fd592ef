"""Accuracy at equal compute: our models against nequip 0.19.1, same data, same wall-clock budget.

Each of our models (a ``matsciml fit`` config in experiments/configs/accuracy/, named by its file)
trains beside nequip's small model (shared/REFERENCE.md section 6; config in
experiments/bench_accuracy_nequip.py), the two runs started together, each pinned to its own CPU
core (``sched_setaffinity``) with one thread (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``;
nequip's prediction also calls ``torch.set_num_threads(1)``), for the same Lightning ``max_time``
and ``max_epochs=-1``. Both validate every epoch on the val split, keep an EMA of the weights,
lower the LR on a plateau of the val force MAE and keep the best checkpoint by it, with a 5 Å
cutoff and every neighbour within it. Then each run's **best** checkpoint (what a user gets)
predicts the test split through its ASE calculator (``MatSciMLCalculator.from_checkpoint(run,
which="best")``; nequip's ``NequIPCalculator`` on ``checkpoints/best.ckpt``), and this script
computes the errors of both from those predictions the same way (experiments/bench_accuracy_scoring.py):

* energy: MAE of the **energy per atom**, ``mean_s |E_pred - E_ref| / N_s`` over test structures,
  total energies as stored in the data, meV/atom;
* forces: MAE over the Cartesian components of the **free** atoms (records' ``fixed`` atoms are
  left out, as in our task's metrics), meV/Å;
* baselines: predicting the training split's mean energy per atom for every atom (``E = N *
  mean_s(E_s / N_s)``), and zero forces;
* steps: ``global_step`` of each run's last checkpoint; parameters: the trained model's.

The splits are read with matsciml's own readers (``S2EFDataset``) and written as extended XYZ
(energy, forces, ``FixAtoms``) for nequip; nequip trains on every atom's forces (it has no notion
of fixed atoms), so on data with fixed atoms it fits labels our models skip. nequip's own test
run (``run: [train, test]``, all atoms) is kept in the JSON as a cross-check.

Environments: our models run in the main environment; nequip in its own (``make venv-nequip``:
``python3 -m venv .venv-nequip`` and ``pip install -c constraints.txt torch==2.13.0 nequip==0.19.1``),
found by ``--nequip-python`` (default ``.venv-nequip/bin/python``).

Usage::

    python experiments/bench_accuracy.py --quick                     # 1-min EGNN + nequip smoke run
    python experiments/bench_accuracy.py --data devsets/s2ef --budget 5 15 --models egnn megnet
    python experiments/bench_accuracy.py --data devsets/md --budget 15 --out experiments/out/accuracy-md
    python experiments/bench_accuracy.py --nequip-python /work/main/.venv-nequip/bin/python --quick

``--out PREFIX`` writes ``PREFIX.json`` (every figure, logs' folders) and ``PREFIX.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from ase.data import chemical_symbols

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy_nequip import nequip_config  # noqa: E402
from bench_accuracy_scoring import SPLITS, baselines, errors, prepare, to_atoms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "experiments" / "configs" / "accuracy"
CUTOFF = 5.0
#: the peer's job in a slot (not a config name: our NequIP-class config may be called nequip)
PEER = "peer:nequip-0.19.1"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# -- runs --------------------------------------------------------------------------------
def max_time(minutes: float) -> str:
    """Lightning's ``DD:HH:MM:SS`` for ``minutes`` (whole seconds)."""
    seconds = round(minutes * 60)
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def ours_command(config: Path, data: Path, run_dir: Path, minutes: float) -> list[str]:
    """``matsciml fit`` of one of our configs on ``data``'s splits for ``minutes`` of training."""
    split = {f"--data.init_args.{s}_path": str(data / s) for s in SPLITS}
    return [
        sys.executable, "-m", "matsciml", "fit", "--config", str(config),
        *[item for pair in split.items() for item in pair],
        "--data.init_args.cutoff", str(CUTOFF), "--data.init_args.predict_path", "null",
        "--trainer.max_epochs", "-1", "--trainer.max_time", max_time(minutes),
        "--trainer.default_root_dir", str(run_dir),
    ]  # fmt: skip


def nequip_command(python: Path, config_dir: Path, run_dir: Path) -> list[str]:
    """``nequip-train`` of the environment ``python`` belongs to, on ``config_dir/config.yaml``."""
    return [
        str(python.parent / "nequip-train"),
        "-cp",
        str(config_dir),
        "-cn",
        "config",
        f"hydra.run.dir={run_dir}/hydra",
    ]


def launch(command: list[str], core: int, log: Path) -> subprocess.Popen:
    """``command`` on CPU ``core`` alone with one thread, output to ``log``."""
    env = {
        **os.environ,
        **ONE_THREAD,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    handle = log.open("w")
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )
    process.started = time.perf_counter()
    handle.close()  # the child holds its own copy
    return process


def wait(process: subprocess.Popen, name: str, log: Path) -> float:
    """Wait for ``process``; its wall time in seconds. A failed run raises with the end of its log."""
    if process.wait() != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{name} failed (exit {process.returncode}); end of {log}:\n{tail}")
    return time.perf_counter() - process.started


def run_folder(root: Path) -> Path:
    """The ``lightning_logs/version_N`` folder ``matsciml fit`` wrote under ``root`` (the newest)."""
    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no lightning_logs/version_* under {root}")
    return versions[-1]


def evaluate_ours(run: Path, test: list[dict]) -> dict:
    """Test errors of the run's best checkpoint (through its ASE calculator), steps and parameters."""
    import torch

    from matsciml.integrations.calculators import MatSciMLCalculator

    torch.set_num_threads(1)
    calc = MatSciMLCalculator.from_checkpoint(run, which="best")
    energy, forces = [], []
    for record in test:
        atoms = to_atoms(record)
        atoms.calc = calc
        energy.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces(apply_constraint=False))  # fixed atoms too, unzeroed
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {
        **errors(np.array(energy), np.concatenate(forces), test),
        "steps": int(last["global_step"]),
        "parameters": sum(p.numel() for p in calc.task.model.parameters()),
    }


def evaluate_nequip(python: Path, run: Path, test_file: str, test: list[dict]) -> dict:
    """The same for nequip's run (predictions by its calculator, in its environment), and its own test log."""
    out = run / "predictions.npz"
    script = ROOT / "experiments" / "bench_accuracy_nequip.py"
    subprocess.run(
        [str(python), str(script), str(run), test_file, str(out)], check=True, env={**os.environ, **ONE_THREAD}
    )
    with np.load(out) as saved:
        result = {
            **errors(saved["energy"], saved["forces"], test),
            "steps": int(saved["steps"]),
            "parameters": int(saved["parameters"]),
        }
    # nequip's last.ckpt is only rewritten when best.ckpt is (save_last with a monitored filename):
    # once validation stops improving it lags, so count the steps from its CSV log instead
    result["steps"] = max(result["steps"], nequip_logged_steps(run))
    result["own_test"] = own = nequip_test_log(run)
    # nequip's test run scores every atom, as force_mae_all_atoms does: the two must agree
    for key, ours in (
        ("energy_mae_mev_per_atom", "energy_mae_mev_per_atom"),
        ("force_mae_mev_per_a", "force_mae_all_atoms_mev_per_a"),
    ):
        if key in own and not np.isclose(own[key], result[ours], rtol=1e-3):
            print(
                f"warning: nequip's own test {key} {own[key]:.3f} differs from the one scored here, {result[ours]:.3f}"
            )
    return result


def nequip_logged_steps(run: Path) -> int:
    """Optimiser steps at nequip's last validation, from its CSV log (whose ``step`` there is one less)."""
    import csv

    rows = [row for path in run.glob("csv/version_*/metrics.csv") for row in csv.DictReader(path.open())]
    return max((int(row["step"]) + 1 for row in rows if row.get("val0_epoch/forces_mae")), default=0)


def nequip_test_log(run: Path) -> dict[str, float]:
    """nequip's own test metrics (every atom; meV) from its CSV log, if logged."""
    import csv

    values = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            for key, unit in (
                ("test0_epoch/per_atom_energy_mae", "energy_mae_mev_per_atom"),
                ("test0_epoch/forces_mae", "force_mae_mev_per_a"),
            ):
                if row.get(key):
                    values[unit] = 1000 * float(row[key])
    return values


def run_slot(args, jobs: list[str], minutes: float, data: dict, work: Path) -> list[dict]:
    """Up to two runs (our config names, or :data:`PEER`) started together, each on its own core; their rows."""
    companion = "+".join(jobs)
    folders = {
        job: work / (f"nequip-beside-{'+'.join(j for j in jobs if j != job) or 'none'}-{minutes:g}min"
                     if job == PEER else f"{job}-{minutes:g}min")
        for job in jobs
    }  # fmt: skip
    for folder in folders.values():
        if folder.exists():
            raise FileExistsError(f"{folder} exists: remove it or pass another --workdir")
        folder.mkdir(parents=True)
    start = time.perf_counter()
    processes = {}
    for job, core in zip(jobs, args.cores, strict=False):
        folder = folders[job].resolve()
        if job == PEER:
            config = nequip_config(
                data["files"], data["types"], str(folder), max_time(minutes), CUTOFF, data["per_type_scales"]
            )
            (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            command = nequip_command(args.nequip_python, folder, folder)
        else:
            command = ours_command(args.models[job], args.data, folder, minutes)
        processes[job] = launch(command, core, folder / "log.txt")
    walls = {job: wait(process, job, folders[job] / "log.txt") for job, process in processes.items()}
    trained = time.perf_counter() - start
    rows = []
    for job in jobs:
        if job == PEER:
            others = [j for j in jobs if j != job]
            row = {"model": f"nequip 0.19.1 (beside {', '.join(others) or 'nothing'})"}
            row.update(
                evaluate_nequip(args.nequip_python, folders[job], data["files"]["test"], data["records"]["test"])
            )
        else:
            row = {"model": job, **evaluate_ours(run_folder(folders[job]), data["records"]["test"])}
        row.update(run=str(folders[job]), budget_min=minutes, process_wall_s=round(walls[job], 1))
        rows.append(row)
    print(
        f"  {companion}, {minutes:g} min: {trained:.0f} s to train, "
        f"{time.perf_counter() - start:.0f} s with evaluation",
        flush=True,
    )
    return rows


def schedule(models: list[str], packed: bool) -> list[list[str]]:
    """The runs of one budget, two at a time: each model beside nequip, or (``packed``) nequip once
    beside the first model and the others two by two, each still alone on its core."""
    if not packed:
        return [[name, PEER] for name in models]
    jobs = [models[0], PEER, *models[1:]] if models else [PEER]
    return [jobs[i : i + 2] for i in range(0, len(jobs), 2)]


# -- report ------------------------------------------------------------------------------
def markdown(rows: list[dict], data: Path, convention: str) -> str:
    """The result table."""

    def cell(row: dict, key: str, digits: int = 1) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"

    lines = [
        f"Data: {data}; {convention}",
        "",
        "| budget | model | test energy MAE (meV/atom) | test force MAE (meV/Å) | steps | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        budget = f"{row['budget_min']:g} min" if "budget_min" in row else "-"
        cells = [
            cell(row, "energy_mae_mev_per_atom"),
            cell(row, "force_mae_mev_per_a"),
            cell(row, "steps"),
            cell(row, "parameters"),
        ]
        lines.append(f"| {budget} | {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CONVENTION = (
    "energy MAE per atom: mean over test structures of |E_pred - E_ref| / N (total energies as stored); "
    "force MAE over the free atoms' components; best checkpoint on validation force MAE."
)


def model_configs(names: list[str] | None) -> dict[str, Path]:
    """``--models``: names of files in experiments/configs/accuracy/ (default all) or paths of configs."""
    available = {p.stem: p for p in sorted(CONFIGS.glob("*.yaml"))}
    if not names:
        return available
    chosen = {}
    for name in names:
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            chosen[path.stem] = path.resolve()
        elif name in available:
            chosen[name] = available[name]
        else:
            raise SystemExit(f"--models: {name!r} is neither a config file nor one of {sorted(available)}")
    return chosen


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT / "devsets" / "s2ef", help="folder with train/val/test S2EF splits"
    )
    parser.add_argument("--budget", type=float, nargs="+", default=[5.0, 15.0], help="training minutes per run")
    parser.add_argument("--models", nargs="+", help="our configs: names in experiments/configs/accuracy/ or paths")
    parser.add_argument(
        "--packed",
        action="store_true",
        help="nequip once per budget (beside the first model), the other models two at a time: fewer slots",
    )
    parser.add_argument("--quick", action="store_true", help="1-minute budget, EGNN only (smoke run)")
    parser.add_argument("--nequip-python", type=Path, default=ROOT / ".venv-nequip" / "bin" / "python")
    parser.add_argument(
        "--cores", type=int, nargs=2, help="CPU cores for ours and nequip (default: the first two allowed)"
    )
    parser.add_argument("--workdir", type=Path, help="run folders (default experiments/out/accuracy-runs/<time>)")
    parser.add_argument("--out", type=Path, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget = [1.0]
        args.models = args.models or ["egnn"]
    args.models = model_configs(args.models)
    if not args.nequip_python.is_file():
        parser.error(f"--nequip-python {args.nequip_python} does not exist: `make venv-nequip`, or pass the path")
    allowed = sorted(os.sched_getaffinity(0))
    args.cores = args.cores or allowed[:2]
    if len(set(args.cores)) < 2 or not set(args.cores) <= set(allowed):
        parser.error(f"need two distinct CPU cores among the allowed {allowed}, got {args.cores}")
    args.data = args.data.resolve()
    args.workdir = (
        args.workdir or ROOT / "experiments" / "out" / "accuracy-runs" / time.strftime("%Y%m%d-%H%M%S")
    ).resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    start = time.perf_counter()
    records, files, types = prepare(args.data, args.workdir)
    train_types = {chemical_symbols[int(z)] for r in records["train"] for z in r["atomic_numbers"]}
    missing = sorted(set(types) - train_types)
    if missing:
        print(f"elements {missing} are absent from training: nequip's energy scale is the global force RMS")
    data = {"records": records, "files": files, "types": types, "per_type_scales": not missing}
    print(f"data {args.data}: {', '.join(f'{s} {len(records[s])}' for s in SPLITS)} structures; "
          f"converted in {time.perf_counter() - start:.1f} s; runs in {args.workdir}", flush=True)  # fmt: skip
    rows = [{"model": name, **values} for name, values in baselines(records["train"], records["test"]).items()]
    for minutes in args.budget:
        for jobs in schedule(list(args.models), args.packed):
            rows += run_slot(args, jobs, minutes, data, args.workdir)
    table = markdown(rows, args.data, CONVENTION)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"data": str(args.data), "convention": CONVENTION, "cores": args.cores, "rows": rows}
        for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", table + "\n")):
            partial = args.out.with_name(args.out.name + suffix + ".partial")
            partial.write_text(text)
            partial.rename(args.out.with_name(args.out.name + suffix))


if __name__ == "__main__":
    main()
