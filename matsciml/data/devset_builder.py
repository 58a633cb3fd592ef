"""Build the shipped S2EF and IS2RE development datasets from physics (ASE EMT).

``matsciml devset build`` calls :func:`build_devsets`. Every system draws its metal,
facet, slab size, adsorbate and placement from its own generator, seeded by
``(seed, task, sid)``, so the output does not depend on the number of worker processes
or their scheduling: the same seed gives identical records and content hashes.

S2EF
    Systems (slab + adsorbate, free atoms rattled by 0.05 Å) are L-BFGS-relaxed with EMT
    (at most :data:`S2EF_RELAX_STEPS` steps), then run for :data:`MD_STEPS` 1 fs steps of
    Langevin MD at 300-800 K. Each system contributes :data:`FRAMES_PER_SYSTEM` frames,
    evenly spaced over its relaxation (about half) and its MD; ``fid`` is the frame's
    index in that combined trajectory.
    ``energy`` is the EMT total energy (eV, EMT's own zero, no reference subtracted) and
    ``forces`` the EMT forces on every atom (fixed ones included, as OC20 stores them).

IS2RE
    The adsorbate is placed on the EMT-relaxed clean slab (``positions``, the initial
    structure), and the system is L-BFGS-relaxed to fmax 0.05 eV/Å, in at most
    :data:`IS2RE_RELAX_STEPS` steps (``relaxed_positions``). Energies are adsorption
    energies::

        relaxed_energy = E(relaxed slab+ads) - E(relaxed clean slab) - sum(gas references)
        initial_energy = E(initial slab+ads) - E(relaxed clean slab) - sum(gas references)

    with per-atom gas references from EMT-relaxed molecules:
    H = E(H2)/2, O = E(O2)/2, N = E(N2)/2, C = E(CO) - E(O2)/2
    (see :func:`matsciml.data.emt_systems.gas_references`). Because the slab part of
    ``positions`` is the relaxed clean slab, every term can be recomputed from a record.

Splits never share a system: ``sid`` values are disjoint between train, val and test.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.md.langevin import Langevin
from rich.console import Console

from matsciml.data import emt_systems as emt
from matsciml.data import keys as K
from matsciml.data.devsets import DEVSET_SPLITS
from matsciml.data.formats.store import DatasetWriter
from matsciml.data.progress import progress_bar
from matsciml.data.records import Record
from matsciml.data.split_build import default_workers, run_jobs

#: Records per split (S2EF frames, IS2RE systems).
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "s2ef": {"train": 200, "val": 100, "test": 100},
    "is2re": {"train": 150, "val": 50, "test": 50},
}
FRAMES_PER_SYSTEM = 10
S2EF_RELAX_STEPS = 60
MD_STEPS = 40
IS2RE_RELAX_STEPS = 1000  # a few CO on (100) need several hundred
# keeps the tasks' random streams apart (s2ef_metals: sets of chosen metals, matsciml.data.element_set)
_STREAM = {"s2ef": 1, "is2re": 2, "s2ef_metals": 3}


def _rng(seed: int, task: str, sid: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[task], sid])


def s2ef_system(
    seed: int, sid: int, num_frames: int = FRAMES_PER_SYSTEM, metals: tuple[str, ...] | None = None
) -> list[Record]:
    """Relax and then heat one slab + adsorbate system; return ``num_frames`` labelled frames.

    Args:
        seed: build seed.
        sid: system id (also selects this system's random stream).
        num_frames: frames to keep from the trajectory.
        metals: the slab metals to draw from (default :data:`~matsciml.data.emt_systems.METALS`,
            the devset's); a choice has its own random stream, apart from the devset's systems.
    """
    rng = _rng(seed, "s2ef" if metals is None else "s2ef_metals", sid)
    spec = emt.random_spec(rng) if metals is None else emt.random_spec(rng, tuple(metals))
    system = emt.place_adsorbate(emt.make_slab(spec), emt.random_adsorbate(rng), rng)
    free = ~emt.fixed_mask(system)
    system.positions[free] += rng.normal(0.0, 0.05, (int(free.sum()), 3))  # give the relaxation work

    trajectory: list[np.ndarray] = []
    record_frame = lambda: trajectory.append(system.positions.copy())  # noqa: E731
    emt.relax(system, fmax=0.05, steps=S2EF_RELAX_STEPS, observer=record_frame)
    num_relax = len(trajectory)
    temperature = rng.uniform(300.0, 800.0)
    # Maxwell-Boltzmann momenta drawn here (not ase.md.velocitydistribution, whose API moved in
    # ASE 3.29); set_momenta applies FixAtoms, so fixed atoms start at rest.
    sigma = np.sqrt(system.get_masses() * units.kB * temperature)[:, None]
    system.set_momenta(sigma * rng.standard_normal((len(system), 3)))
    # fixcm=False: FixAtoms already anchors the slab, and ASE deprecates fixcm=True.
    dynamics = Langevin(
        system, 1.0 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, fixcm=False, rng=rng, logfile=None
    )
    dynamics.attach(record_frame, interval=1)
    dynamics.run(MD_STEPS)

    relax_frames = _spaced(0, num_relax, num_frames // 2)
    md_frames = _spaced(num_relax, len(trajectory), num_frames - len(relax_frames), skip_first=True)
    records = []
    for fid in itertools.chain(relax_frames, md_frames):
        frame = system.copy()
        frame.positions = trajectory[fid]
        positions, energy, forces = emt.emt_labels(frame)
        record = emt.base_record(frame, sid)
        record.update(
            {
                K.POSITIONS: positions.astype(np.float32),
                K.FID: np.asarray(fid, dtype=np.int64),
                K.ENERGY: np.asarray(energy, dtype=np.float32),
                K.FORCES: forces.astype(np.float32),
            }
        )
        records.append(record)
    return records


def _spaced(start: int, stop: int, count: int, skip_first: bool = False) -> list[int]:
    """``count`` distinct indices evenly spread over ``range(start, stop)`` (fewer if it is short)."""
    if skip_first:  # the first MD frame repeats the last relaxation frame
        start = min(start + 1, stop)
    count = min(count, stop - start)
    if count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(start, stop - 1, count).round()})


def is2re_system(seed: int, sid: int) -> Record:
    """Place an adsorbate on a relaxed clean slab, relax it, and return the IS2RE record."""
    rng = _rng(seed, "is2re", sid)
    spec, name = emt.random_spec(rng), emt.random_adsorbate(rng)
    slab = emt.relaxed_clean_slab(spec)
    initial = emt.place_adsorbate(slab, name, rng)
    relaxed = emt.relax(initial.copy(), fmax=0.05, steps=IS2RE_RELAX_STEPS)
    offset = emt.emt_energy(slab) + emt.reference_sum(list(emt.ADSORBATES[name][0]))
    record = emt.base_record(initial, sid)
    record.update(
        {
            K.RELAXED_POSITIONS: relaxed.positions.astype(np.float32),
            K.INITIAL_ENERGY: np.asarray(emt.emt_energy(initial) - offset, dtype=np.float32),
            K.RELAXED_ENERGY: np.asarray(emt.emt_energy(relaxed) - offset, dtype=np.float32),
        }
    )
    return record


def _run_job(job: tuple[str, str, int, int, int]) -> list[Record]:
    task, _split, seed, sid, num_frames = job
    if task == "s2ef":
        return s2ef_system(seed, sid, num_frames)
    return [is2re_system(seed, sid)]


def _jobs(seed: int, sizes: dict[str, dict[str, int]]) -> list[tuple[str, str, int, int, int]]:
    """One job per system, in write order; sids run on across splits so splits never share one."""
    jobs = []
    for task in ("s2ef", "is2re"):
        sid = 0
        for split in DEVSET_SPLITS:
            remaining = sizes[task][split]
            while remaining > 0:
                frames = min(FRAMES_PER_SYSTEM, remaining) if task == "s2ef" else 1
                jobs.append((task, split, seed, sid, frames))
                remaining -= frames
                sid += 1
    return jobs


def _source_text(task: str, seed: int) -> str:
    refs = ", ".join(f"{s}={e:.6f}" for s, e in emt.gas_references().items())
    what = (
        "frames from EMT L-BFGS relaxations and 300-800 K Langevin MD; energy = EMT total energy"
        if task == "s2ef"
        else "EMT-relaxed adsorbates; energies are adsorption energies vs the relaxed clean slab"
        f" and per-atom gas references (eV): {refs}"
    )
    return (
        f"Generated by matsciml.data.devset_builder (seed {seed}) with ASE EMT: {', '.join(emt.METALS)}"
        f" (111)/(100)/(211) slabs with H/C/N/O adsorbates; {what}."
    )


def _merge_sizes(sizes: dict | None) -> dict[str, dict[str, int]]:
    """:data:`DEFAULT_SIZES` updated with ``sizes``, checked for unknown keys and counts below 1."""
    sizes = sizes or {}
    unknown = [t for t in sizes if t not in DEFAULT_SIZES] + [
        f"{t}/{s}" for t in sizes if t in DEFAULT_SIZES for s in sizes[t] if s not in DEVSET_SPLITS
    ]
    if unknown:
        raise ValueError(
            f"sizes has unknown entries {unknown}; use {{task: {{split: count}}}} with tasks"
            f" {tuple(DEFAULT_SIZES)} and splits {DEVSET_SPLITS}"
        )
    merged = {task: {**DEFAULT_SIZES[task], **sizes.get(task, {})} for task in DEFAULT_SIZES}
    for task, splits in merged.items():
        for split, count in splits.items():
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"sizes[{task!r}][{split!r}] must be a positive integer, got {count!r}")
    return merged


def build_devsets(
    out: Path,
    seed: int = 0,
    overwrite: bool = False,
    sizes: dict | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> None:
    """Generate ``out/s2ef/{train,val,test}`` (sharded) and ``out/is2re/{train,val,test}``.

    Args:
        out: output folder (the repository's ``devsets/`` for the shipped data).
        seed: build seed; the same seed gives identical records and content hashes.
        overwrite: replace existing splits.
        sizes: records per split, e.g. ``{"s2ef": {"train": 20, ...}, "is2re": {...}}``;
            missing entries take :data:`DEFAULT_SIZES`.
        workers: worker processes (default: up to 4, one per core); results do not depend on it.
        progress: show a progress bar.

    Raises:
        FileExistsError: a split exists and ``overwrite`` is False (checked before any work).
        ValueError: ``sizes`` names an unknown task or split, or a count below 1.
    """
    out = Path(out)
    sizes = _merge_sizes(sizes)
    existing = [out / t / s for t in sizes for s in DEVSET_SPLITS if (out / t / s).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))} already exist; pass overwrite=True (--overwrite)")
    workers = default_workers() if workers is None else workers
    emt.gas_references()  # for the dataset cards; workers compute (and cache) their own
    jobs = _jobs(seed, sizes)
    shard_size = max(1, math.ceil(sizes["s2ef"]["train"] / 3))  # train in three shards, like OC20 S2EF

    start = time.perf_counter()
    with progress_bar(unit="systems", disable=not progress) as bar:
        bar_task = bar.add_task("EMT systems", total=len(jobs))
        results = zip(jobs, run_jobs(_run_job, jobs, workers), strict=True)
        for (task, split), group in itertools.groupby(results, key=lambda item: item[0][:2]):
            bar.update(bar_task, description=f"{task}/{split}")
            (out / task).mkdir(parents=True, exist_ok=True)
            with DatasetWriter(
                out / task / split,
                task=task,
                records_per_shard=shard_size if task == "s2ef" else None,
                source=_source_text(task, seed),
                command=f"matsciml devset build --seed {seed}",
                title=f"matsciml EMT devset: {task.upper()} {split}",
                overwrite=overwrite,
                license="MIT (generated by matsciml, like its code)",
            ) as writer:
                for job, records in group:
                    for index, record in enumerate(records):
                        writer.add(record, f"{task}/{split} sid {job[3]}", index)  # validates
                    bar.advance(bar_task)
    if progress:
        Console().print(f"built devsets in {out} in {time.perf_counter() - start:.1f} s")
