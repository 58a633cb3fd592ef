"""``matsciml devset build|md|synthetic``: the development datasets, each write with its step record."""

from __future__ import annotations

import argparse
from pathlib import Path

from matsciml.cli.args import positive_int, step_config


def _cmd_devset_build(args: argparse.Namespace) -> None:
    if args.metals is not None:
        return _cmd_element_set(args)
    if args.structures is not None:
        raise ValueError("--structures sets the size of a --metals set; the shipped devsets have fixed sizes")
    args.out = Path("devsets") if args.out is None else args.out
    from matsciml.data.devset_builder import build_devsets
    from matsciml.data.fingerprint import dataset_digest
    from matsciml.records.provenance import StepRecord, recorded

    # the record of the whole build sits in the output folder, beside the task folders
    with recorded(StepRecord(args.out, "devset build", command=args.command, config=step_config(args))) as record:
        build_devsets(args.out, seed=args.seed, overwrite=args.overwrite, workers=args.workers)
        for dataset in sorted(args.out.glob("*/*/")):
            record.add_output(
                f"dataset:{dataset.parent.name}/{dataset.name}", dataset, kind="dataset", digest=dataset_digest(dataset)
            )


def _cmd_element_set(args: argparse.Namespace) -> None:
    from matsciml.data.element_set import build_element_set, check_metals, split_sizes
    from matsciml.data.fingerprint import dataset_digest
    from matsciml.records.provenance import dataset_record, recorded

    if args.out is None:  # never the shipped devsets folder by default
        raise ValueError("--metals needs --out: the folder of the new set (e.g. --out data/al)")
    structures = 60 if args.structures is None else args.structures
    check_metals(args.metals)  # checked first: a refused value leaves no record behind
    split_sizes(structures)
    # beside the set (<out>.step.json), as its three splits move into place together at the end
    with recorded(dataset_record(args.out, "devset build", args.command, step_config(args))) as record:
        build_element_set(args.out, args.metals, structures, args.seed, args.overwrite, workers=args.workers)
        for split in ("train", "val", "test"):
            path = args.out / split
            record.add_output(f"dataset:{split}", path, kind="dataset", digest=dataset_digest(path))


def _cmd_devset_md(args: argparse.Namespace) -> None:
    from matsciml.data.fingerprint import dataset_digest
    from matsciml.data.md_devset import build_md_devset
    from matsciml.records.provenance import dataset_record, recorded

    frames = {split: getattr(args, f"frames_{split}") for split in ("train", "val", "test")}
    # beside the devset (devsets/md.step.json), as its three splits move into place together at the end
    with recorded(dataset_record(args.out, "devset md", args.command, step_config(args))) as record:
        build_md_devset(args.out, args.seed, args.overwrite, frames, workers=args.workers)
        for split in frames:
            path = args.out / split
            record.add_output(f"dataset:md/{split}", path, kind="dataset", digest=dataset_digest(path))


def _cmd_devset_synthetic(args: argparse.Namespace) -> None:
    from matsciml.data.fingerprint import dataset_digest
    from matsciml.data.synthetic import write_synthetic
    from matsciml.records.provenance import dataset_record, recorded

    with recorded(dataset_record(args.destination, "devset synthetic", args.command, step_config(args))) as record:
        write_synthetic(
            args.destination,
            num_structures=args.num,
            task=args.task,
            seed=args.seed,
            records_per_shard=args.records_per_shard,
            overwrite=args.overwrite,
        )
        record.add_output("dataset", args.destination, kind="dataset", digest=dataset_digest(args.destination))


def add_devset_commands(commands: argparse._SubParsersAction) -> None:
    devset = commands.add_parser("devset", help="build the development datasets")
    devset_commands = devset.add_subparsers(dest="devset_command", required=True, metavar="ACTION")
    build = devset_commands.add_parser("build", help="regenerate the shipped S2EF and IS2RE devsets (ASE EMT)")
    build.add_argument("--out", type=Path, help="output folder (default: devsets; required with --metals)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--workers", type=positive_int, help="parallel EMT processes (default: one per core, up to 4)")
    build.add_argument("--overwrite", action="store_true")
    build.add_argument(
        "--metals",
        nargs="+",
        metavar="SYMBOL",
        help="instead, a small S2EF set of these slab metals (e.g. Al: not in devsets/s2ef's train split) "
        "in --out/{train,val,test}, its record in <out>.step.json",
    )
    build.add_argument(
        "--structures", type=positive_int, help="with --metals: frames in all, split 3:1:1 (default: 60)"
    )
    build.set_defaults(func=_cmd_devset_build)

    md = devset_commands.add_parser("md", help="regenerate the shipped MD devset: liquid CuPdAu frames (ASE EMT)")
    md.add_argument("--out", type=Path, default=Path("devsets/md"), help="output folder (default: devsets/md)")
    md.add_argument("--seed", type=int, default=0)
    for split, count in (("train", 130), ("val", 30), ("test", 50)):
        md.add_argument(f"--frames-{split}", type=positive_int, default=count, help="frames (default: %(default)s)")
    md.add_argument("--workers", type=positive_int, help="parallel EMT processes (default: one per core, up to 4)")
    md.add_argument("--overwrite", action="store_true")
    md.set_defaults(func=_cmd_devset_md)

    synthetic = devset_commands.add_parser("synthetic", help="write N random OC20-sized structures, fast")
    synthetic.add_argument("destination", type=Path)
    synthetic.add_argument("--num", type=positive_int, default=10_000)
    synthetic.add_argument("--task", default="s2ef", choices=("s2ef", "is2re"))
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--records-per-shard", type=positive_int, default=5_000)
    synthetic.add_argument("--overwrite", action="store_true")
    synthetic.set_defaults(func=_cmd_devset_synthetic)
