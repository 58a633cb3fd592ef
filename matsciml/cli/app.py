"""The ``matsciml`` command line.

Data subcommands (``data info|check|convert``; ``devset build|md|synthetic`` in
:mod:`matsciml.cli.devset`) are plain argparse; heavy modules are imported only by the
subcommand that needs them, so ``matsciml --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matsciml.cli.args import non_negative_int, positive_int, step_config
from matsciml.cli.devset import add_devset_commands
from matsciml.cli.runs import add_runs_commands


def _dataset_path(args: argparse.Namespace) -> Path:
    if args.devset:
        from matsciml.data.devsets import devset_path

        task, _, split = args.devset.partition("/")
        return devset_path(task, split or args.split)
    if args.path is None:
        raise argparse.ArgumentError(None, "give a dataset PATH or --devset TASK")
    return Path(args.path)


def _cmd_data_info(args: argparse.Namespace) -> None:
    from matsciml.data.info import describe

    describe(_dataset_path(args), as_json=args.json)


def _cmd_data_check(args: argparse.Namespace) -> None:
    from matsciml.data.check import check_dataset

    check_dataset(
        _dataset_path(args),
        task=args.task,
        batch_size=args.batch_size,
        cutoff=args.cutoff,
        max_neighbors=args.max_neighbors,
        num_workers=args.num_workers,
        limit=args.limit,
        verify=args.verify,
        min_distance=args.min_distance,
    )


def _cmd_data_convert(args: argparse.Namespace) -> None:
    from matsciml.data.convert import convert
    from matsciml.data.fingerprint import dataset_digest
    from matsciml.records.provenance import dataset_record, recorded

    record = dataset_record(args.destination, "data convert", args.command, step_config(args))
    for source in args.sources:
        record.add_input("source", source, kind="file" if source.is_file() else "directory")
    with recorded(record):
        convert(
            args.sources,
            args.destination,
            task=args.task,
            records_per_shard=args.records_per_shard,
            num_workers=args.workers,
            overwrite=args.overwrite,
            title=args.title,
            license=args.license,
            min_distance=args.min_distance,
        )
        record.add_output("dataset", args.destination, kind="dataset", digest=dataset_digest(args.destination))


def _cmd_hpo(args: argparse.Namespace) -> None:
    from matsciml.hpo.study import run_hpo

    run_hpo(
        args.config,
        args.space,
        args.trials,
        backend=args.backend,
        study_dir=args.study_dir,
        study_name=args.study_name,
        command=args.command,
    )


def _add_dataset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", help="dataset directory or .lmdb file")
    parser.add_argument("--devset", metavar="NAME[/SPLIT]", help="a shipped devset: s2ef, is2re or md")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))


def _add_min_distance_argument(parser: argparse.ArgumentParser) -> None:  # default: min_distance.DEFAULT_MIN_DISTANCE
    text = "refuse two atoms closer than this, in Å, periodic images included (0: no check; default: %(default)s)"
    parser.add_argument("--min-distance", type=float, default=0.1, metavar="Å", help=text)


def build_parser() -> argparse.ArgumentParser:
    import matsciml

    parser = argparse.ArgumentParser(prog="matsciml", description=matsciml.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"matsciml {matsciml.__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of errors (also MATSCIML_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # fit/validate/test/predict are dispatched to LightningCLI before argparse sees them;
    # they are listed here so that `matsciml --help` shows them.
    for name, text in TRAINING_HELP.items():
        commands.add_parser(name, help=f"{text} (LightningCLI: matsciml {name} --config FILE; see --help)")

    data = commands.add_parser("data", help="inspect, check and convert datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    info = data_commands.add_parser("info", help="print a summary of any supported dataset")
    _add_dataset_argument(info)
    info.add_argument("--json", action="store_true", help="print the metadata card as JSON")
    info.set_defaults(func=_cmd_data_info)

    check = data_commands.add_parser("check", help="read every record, build graphs and batches, and report problems")
    _add_dataset_argument(check)
    check.add_argument("--task", choices=("s2ef", "is2re"), help="require this task's targets")
    check.add_argument("--batch-size", type=positive_int, default=8)
    check.add_argument("--cutoff", type=float, default=6.0, help="radius graph cutoff in Å")
    check.add_argument(
        "--max-neighbors",
        type=positive_int,
        default=None,
        help="keep only this many nearest neighbours per atom (default: every pair within the cutoff)",
    )
    check.add_argument("--num-workers", type=non_negative_int, default=0)
    check.add_argument("--limit", type=positive_int, help="stop after this many structures")
    check.add_argument("--verify", action="store_true", help="also recompute the card's SHA-256 content hash")
    _add_min_distance_argument(check)
    check.set_defaults(func=_cmd_data_check)

    convert = data_commands.add_parser(
        "convert", help="convert extxyz / ASE trajectory / ASE database / pymatgen files to matsciml LMDB"
    )
    convert.add_argument("sources", nargs="+", type=Path, help="input files or folders")
    convert.add_argument("destination", type=Path, help="dataset directory to create")
    convert.add_argument("--task", required=True, choices=("s2ef", "is2re"))
    convert.add_argument(
        "--records-per-shard",
        type=non_negative_int,
        default=None,
        help="shard size; 0 writes one data.lmdb (default: 10000 for s2ef, one file for is2re)",
    )
    convert.add_argument("--workers", type=non_negative_int, default=1, help="parallel reader processes")
    convert.add_argument("--title", help="dataset title for the metadata card")
    convert.add_argument(
        "--license", default="unspecified", help="the data's license, for the metadata card (e.g. CC-BY-4.0 for OC20)"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    _add_min_distance_argument(convert)
    convert.set_defaults(func=_cmd_data_convert)

    add_devset_commands(commands)
    add_runs_commands(commands)
    _add_hpo_command(commands)
    _add_export_command(commands)
    _add_predict_structures_command(commands)
    return parser


def _cmd_export(args: argparse.Namespace) -> None:
    from matsciml.artifacts.export import export_package
    from matsciml.records.lineage import format_chain, read_card

    out = export_package(
        args.checkpoint,
        args.out,
        as_zip=True if args.zip else None,
        overwrite=args.overwrite,
        intended_use=args.intended_use,
        command=args.command,
        config=step_config(args),
        which=args.which,
    )
    print(f"matsciml: wrote {out} (record: {out}.step.json)")
    card = read_card(out)
    print("lineage (0: this model, then the models it was fine-tuned from):")
    print("\n".join(format_chain(card["lineage"])))


def _add_trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="NAME",
        help="a module (and its submodules) whose task or model classes a checkpoint or package "
        "may name, besides matsciml's (repeatable; see docs/export.md)",
    )


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="package a checkpoint as weights + JSON + model card (docs/export.md)")
    export.add_argument("checkpoint", type=Path, help="a checkpoint written by matsciml fit, or its run folder")
    export.add_argument(
        "--which",
        choices=("best", "last"),
        help="for a run folder: checkpoints/best.ckpt (best validation) or last.ckpt (default)",
    )
    export.add_argument("--out", type=Path, required=True, help="package folder (model.msml), or a .zip file")
    export.add_argument("--zip", action="store_true", help="write a zip whatever --out ends with")
    export.add_argument("--intended-use", help="the card's intended_use text (default: one on the training data)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing package at --out")
    _add_trust_argument(export)
    export.set_defaults(func=_cmd_export)


def _add_hpo_command(commands: argparse._SubParsersAction) -> None:
    hpo = commands.add_parser("hpo", help="hyperparameter search over fit runs (Optuna or SigOpt; docs/hpo.md)")
    hpo.add_argument("--config", type=Path, required=True, help="the base fit config (configs/devset/is2re-egnn.yaml)")
    hpo.add_argument("--space", type=Path, required=True, help="the search space (configs/hpo/is2re-egnn-space.yaml)")
    hpo.add_argument(
        "--trials",
        type=positive_int,
        required=True,
        help="run until the study holds this many trials (re-running resumes it)",
    )
    hpo.add_argument("--backend", choices=("optuna", "sigopt"), default="optuna")
    hpo.add_argument("--study-dir", type=Path, help="where the study lives (default: runs/hpo/STUDY_NAME)")
    hpo.add_argument("--study-name", help="default: the space file's name without .yaml")
    hpo.set_defaults(func=_cmd_hpo)


def _cmd_predict_structures(args: argparse.Namespace) -> None:
    from matsciml.integrations.batch_prediction import load_any, predict_files
    from matsciml.records.provenance import dataset_record, recorded

    record = dataset_record(args.out, "predict-structures", args.command, step_config(args))
    record.add_input("model", args.model, kind="checkpoint" if args.model.is_file() else "directory")
    for path in args.inputs:
        record.add_input("structures", path)
    with recorded(record):
        task = load_any(args.model, device=args.device)
        count = predict_files(
            task,
            args.inputs,
            args.out,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            max_neighbors=_max_neighbors(args.max_neighbors),
        )
        record.add_output("predictions", args.out, kind="predictions")
        record.set_metrics(final={"structures": count})
    print(f"matsciml: wrote {count} structures with energies and forces to {args.out}")


def _max_neighbors(value: int | None) -> int | str | None:
    """``--max-neighbors``: absent -> as trained, 0 -> no cap, N -> N."""
    from matsciml.integrations.calculators import TRAINED

    return TRAINED if value is None else value or None


def _add_predict_structures_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "predict-structures", help="energies and forces for structure files (any ASE format) into one extxyz"
    )
    parser.add_argument("model", type=Path, help="a checkpoint (.ckpt) or an exported package (matsciml export)")
    parser.add_argument("inputs", nargs="+", type=Path, help="structure files, every frame of each")
    parser.add_argument("--out", type=Path, required=True, help="extxyz file to write (resumes a partial one)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader processes building graphs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument(
        "--max-neighbors",
        type=non_negative_int,
        default=None,
        help="neighbour cap (default: as recorded at training, none for models trained without "
        "one); 0: every neighbour within the cutoff",
    )
    _add_trust_argument(parser)
    parser.set_defaults(func=_cmd_predict_structures)


TRAINING_HELP = {
    "fit": "train a model",
    "validate": "evaluate on the validation split",
    "test": "evaluate on the test split",
    "predict": "predict energies and forces",
}


def main(argv: list[str] | None = None) -> int:
    from matsciml.cli.errors import ARGUMENT_ERRORS, debug_flag, job_errors, report

    argv = sys.argv[1:] if argv is None else list(argv)
    with debug_flag(argv) as argv, job_errors():  # --debug: tracebacks of input errors too (matsciml.cli.errors)
        training = bool(argv) and argv[0] in TRAINING_HELP
        try:
            _run_training(argv) if training else _run_command(argv)
        except (Exception, KeyboardInterrupt) as err:  # input errors: one line, exit 2; bugs re-raised
            return report(err, extra=() if training else ARGUMENT_ERRORS)
    return 0


def _run_training(argv: list[str]) -> None:
    from matsciml.artifacts.trust import pop_trust_flags, trusting
    from matsciml.cli.training import run

    # LightningCLI does not know --trust-module: it goes to the environment, which the
    # processes of a DDP run inherit (they re-run the command line without it)
    argv, trusted = pop_trust_flags(argv)
    with trusting(trusted):
        run(argv)


def _run_command(argv: list[str]) -> None:
    from matsciml.artifacts.trust import trusting

    args = build_parser().parse_args(argv)
    args.command = ["matsciml", *argv]
    with trusting(getattr(args, "trust_module", [])):  # for every loader the command calls
        args.func(args)


if __name__ == "__main__":
    sys.exit(main())
