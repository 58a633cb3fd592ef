"""``matsciml data info``: a summary of any supported dataset."""

from __future__ import annotations

import json
from pathlib import Path

from ase.data import chemical_symbols
from rich.console import Console
from rich.table import Table

from matsciml.data import keys as K
from matsciml.data.composition import fit_references
from matsciml.data.datasets import LMDBDataset
from matsciml.data.formats.card import COMPOSITION, DatasetStatistics

#: Legacy OC20 files carry no card: summarise this many records instead of all of them.
LEGACY_SAMPLE = 1000


def dataset_card(path: str | Path) -> tuple[dict, LMDBDataset]:
    """The dataset's metadata card; for legacy OC20 files, one computed from a sample."""
    dataset = LMDBDataset(path)
    if dataset.metadata is not None:
        card = {key: value for key, value in dataset.metadata.items() if key != "shard"}
        # what was opened: one shard file named on its own holds part of the card's records
        card["num_records"], card["num_shards"] = len(dataset), len(dataset.shards)
        return card, dataset
    count = min(len(dataset), LEGACY_SAMPLE)
    first = dataset.read(0)
    task = "is2re" if K.RELAXED_ENERGY in first else "s2ef" if K.FORCES in first else "unknown"
    stats = DatasetStatistics(task)
    for index in range(count):
        stats.add(dataset.read(index))
    card = {
        "format": "oc20-pickle",
        "task": task,
        "num_records": len(dataset),
        "num_shards": len(dataset.shards),
        "fields": sorted(first),
        "sampled_records": count,
        **stats.summary(),
    }
    return card, dataset


def describe(path: str | Path, as_json: bool = False, console: Console | None = None) -> dict:
    """Print a summary of the dataset at ``path`` and return its card."""
    console = console or Console()
    card, dataset = dataset_card(path)
    if as_json:
        console.print_json(json.dumps(card))
        return card
    table = Table(title=f"{path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    sampled = card.get("sampled_records")
    note = f" (statistics from the first {sampled})" if sampled and sampled < card["num_records"] else ""
    rows = [
        ("title", card.get("title", "")),
        ("format", f"{card['format']}, {card['num_shards']} shard(s)"),
        ("task", card["task"]),
        ("records", f"{card['num_records']:,}{note}"),
        ("atoms", f"{card['num_atoms']:,} ({card['num_fixed_atoms']:,} fixed)"),
        ("elements", " ".join(f"{chemical_symbols[int(z)]}:{n}" for z, n in card["elements"].items())),
        ("natoms", _natoms_summary(card["natoms_histogram"])),
    ]
    for name, stats in card["statistics"].items():
        if name == COMPOSITION:  # the sums themselves are unreadable: show the references they give
            fitted = fit_references(stats)
            rows.append(
                (
                    "references eV",
                    " ".join(f"{chemical_symbols[z]}:{r:+.3f}" for z, r in fitted.items())
                    + "  (least squares per atom, less the mean shift)",
                )
            )
        elif name == K.FORCES:
            norms = stats["norms"]
            rows.append(("|forces| eV/Å", f"mean {norms['mean']:.3f}  std {norms['std']:.3f}  max {norms['max']:.3f}"))
        else:
            rows.append(
                (
                    f"{name} eV",
                    f"mean {stats['mean']:.4f}  std {stats['std']:.4f}  min {stats['min']:.4f}  max {stats['max']:.4f}",
                )
            )
    for key in ("source", "command", "content_hash", "matsciml_version"):
        if card.get(key):
            rows.append((key, str(card[key])))
    # cards written before the field existed (the shipped devsets) have none
    rows.append(("license", card.get("license") or "not recorded"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    return card


def _natoms_summary(histogram: dict[str, int]) -> str:
    sizes = [(int(n), c) for n, c in histogram.items()]
    total = sum(c for _, c in sizes)
    mean = sum(n * c for n, c in sizes) / total
    return f"min {min(n for n, _ in sizes)}  mean {mean:.1f}  max {max(n for n, _ in sizes)}"
