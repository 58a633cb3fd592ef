"""``matsciml runs list|show|compare|dvc-stage|plot``: step records of runs, read back.

Each command imports what it needs when it runs, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_runs_list(args: argparse.Namespace) -> None:
    from matsciml.records import runs

    frame = runs.load(args.paths, where=args.where)
    if args.metrics:
        frame = frame[[c for c in runs.COLUMNS if c not in ("path", "run_id")] + args.metrics]
    elif args.format == "table":  # every metric is too wide for a terminal: the main ones
        frame = frame[
            [
                c
                for c in frame.columns
                if c not in ("path", "run_id") and not c.startswith("train/") and not c.endswith(("_step", "_baseline"))
            ]
        ]
    print(runs.render(frame, args.format))


def _cmd_runs_show(args: argparse.Namespace) -> None:
    import json

    from matsciml.records.provenance import load_record
    from matsciml.records.runs import status

    record = load_record(args.run)
    if args.json:
        print(json.dumps(record, indent=1))
        return
    print(
        f"{record['step']} {status(record)}  run {record['run_id']}  {record['started_at']}  "
        f"{record['duration_s'] or 0:.1f} s"
    )
    print("command: " + " ".join(record["command"]))
    git = record["code"]["git"] or {}
    print(f"code: matsciml {record['code']['version']}  commit {git.get('commit')}  dirty {git.get('dirty')}")
    if record["error"]:
        print(f"error: {record['error']['type']}: {record['error']['message']}")
    if record.get("heartbeat"):
        beat = record["heartbeat"]
        print(f"heartbeat: {beat['at']}  pid {beat['pid']} on {beat['hostname']}")
    for resume in record.get("resumes", []):
        print(
            f"resumed: {resume['at']}  at step {resume['step']} (epoch {resume['epoch']}) from {resume['checkpoint']}"
        )
    if record.get("lineage"):
        from matsciml.records.lineage import format_chain

        lineage = record["lineage"]
        counts = ", ".join(f"{key} {value}" for key, value in lineage["counts"].items())
        print(f"lineage: init_from {lineage['init_from']}  ({counts})")
        print("\n".join(format_chain(lineage["parent"], first=1)))
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for entry in record[kind]:
            print(f"  {entry['role']:28s} {entry['path']}  {(entry['digest'] or '-')[:19]}")
    print("metrics (final):")
    for name, value in sorted(record["metrics"]["final"].items()):
        print(f"  {name:36s} {value}")


def _cmd_runs_compare(args: argparse.Namespace) -> None:
    from matsciml.records import runs

    table = runs.compare(runs.load(args.paths, where=args.where), args.group_by, args.metrics)
    print(runs.render(runs.with_plus_minus(table, args.metrics) if args.format == "table" else table, args.format))


def _cmd_runs_dvc_stage(args: argparse.Namespace) -> None:
    import yaml

    from matsciml.records.runs import dvc_stage, find_runs, load_record

    name = args.name or load_record(find_runs([args.run])[0])["step"].replace(" ", "-")
    print(yaml.safe_dump({"stages": {name: dvc_stage(args.run)}}, sort_keys=False), end="")


def _cmd_runs_plot(args: argparse.Namespace) -> None:
    import os

    from matsciml.records import plots, runs

    frame = runs.load(args.runs)
    if frame.empty:
        raise FileNotFoundError(f"no step records under {', '.join(map(str, args.runs))}")
    # a run's folder name (version_0) repeats across save_dirs: then name runs by their paths past the common part
    folders = [Path(p).parent for p in frame["path"]]
    names = [f.name for f in folders]
    if len(set(names)) < len(names):
        common = Path(os.path.commonpath(folders))
        names = [str(f.relative_to(common)) if f != common else f.name for f in folders]
    histories = {}
    for name, path in zip(names, frame["path"], strict=True):
        try:
            histories[name] = runs.history(path)
        except FileNotFoundError:  # a record without metrics.csv (e.g. a dataset's): nothing to draw
            continue
    if not histories:
        raise FileNotFoundError(f"no run under {', '.join(map(str, args.runs))} has a metric history")
    figure, final = plots.runs_figure(histories, args.metric)
    print(plots.save_png(figure, args.out, final))


def add_runs_commands(commands: argparse._SubParsersAction) -> None:
    runs = commands.add_parser("runs", help="list, show and compare runs from their step records")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    where = "a filter of comparisons joined by and/or/not, e.g. \"status == 'COMPLETED' and model == 'EGNN'\""
    listing = runs_commands.add_parser("list", help="one line per run")
    compare = runs_commands.add_parser("compare", help="metrics per group: mean ± std over runs (e.g. seeds)")
    for parser in (listing, compare):
        parser.add_argument("paths", nargs="*", default=["runs"], help="run directories or folders of runs")
        parser.add_argument("--where", help=where)
        parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    listing.add_argument("--metrics", nargs="+", help="metric columns to show (default: the validation ones)")
    listing.set_defaults(func=_cmd_runs_list)
    compare.add_argument("--group-by", nargs="+", default=["model"], help="columns to group on (default: model)")
    compare.add_argument("--metrics", nargs="+", default=["val/energy_mae"])
    compare.set_defaults(func=_cmd_runs_compare)
    show = runs_commands.add_parser("show", help="one run's record")
    show.add_argument("run", type=Path, help="run directory or step.json")
    show.add_argument("--json", action="store_true", help="print the whole record")
    show.set_defaults(func=_cmd_runs_show)
    stage = runs_commands.add_parser("dvc-stage", help="print a dvc.yaml stage that reproduces the run")
    stage.add_argument("run", type=Path, help="run directory or record file (e.g. data/train.step.json)")
    stage.add_argument("--name", help="stage name (default: the step, e.g. fit, data-convert)")
    stage.set_defaults(func=_cmd_runs_dvc_stage)
    plot = runs_commands.add_parser("plot", help="overlay the learning curves of runs in one PNG")
    plot.add_argument("runs", nargs="+", help="run directories or folders of runs")
    plot.add_argument("--metric", nargs="+", default=["val/energy_mae"], help="metrics.csv columns, one panel each")
    plot.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write (default: curves.png)")
    plot.set_defaults(func=_cmd_runs_plot)
