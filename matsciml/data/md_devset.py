"""Build the shipped molecular-dynamics devset: S2EF frames of a hot liquid alloy (ASE EMT).

``matsciml devset md`` calls :func:`build_md_devset`. Unlike the slab devsets
(:mod:`matsciml.data.devset_builder`), every frame is a 3D-periodic bulk cell with no vacuum
and no fixed atoms, sampled from a diffusing liquid, the kind of data an interatomic potential
is trained on from DFT molecular dynamics.

System
    80 atoms of Cu60Pd20Au20 (:data:`COMPOSITION`, all fcc metals EMT has parameters for),
    in a cubic cell of :data:`VOLUME_PER_ATOM` Å^3 per atom, where EMT's mean pressure at
    :data:`TEMPERATURE` is about zero. At 1500 K the EMT alloy is liquid (self-diffusion
    ~3e-5 cm^2/s, measured from the mean square displacement).

Trajectory
    Each trajectory starts from 80 of the 108 sites of a 3x3x3 fcc lattice (its own random
    choice and species order), melts for :data:`MELT_STEPS` Langevin steps at
    :data:`MELT_TEMPERATURE`, equilibrates for :data:`EQUILIBRATION_STEPS` at
    :data:`TEMPERATURE`, then keeps one frame every :data:`FRAME_INTERVAL` steps. The 4 fs
    step conserves energy in NVE (drift 0.07 meV/atom over 1.5 ps at 1500 K, fluctuation
    0.06 meV/atom); the force autocorrelation of the liquid falls below 0.05 after 150 fs, so
    frames 160 fs apart are decorrelated (:func:`frame_correlation` measures it on the data).

Records
    ``energy`` is the EMT total energy (eV, EMT's zero), ``forces`` the EMT forces on every
    atom, both computed at the float32 positions that are stored (wrapped into the cell);
    ``tags`` are 0 and ``fixed`` False for every atom; ``sid`` is the trajectory and ``fid``
    the MD step of the frame. Splits come from separate trajectories (``sid`` disjoint), so
    no test frame is a time neighbour of a training frame, and every split holds every element.

Each trajectory draws from its own random stream, seeded by ``(seed, sid)``: the output does
not depend on the number of worker processes, and the same seed gives identical content hashes.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from rich.console import Console

from matsciml.data import emt_systems as emt
from matsciml.data import keys as K
from matsciml.data.devsets import DEVSET_SPLITS
from matsciml.data.formats.store import DatasetWriter
from matsciml.data.progress import progress_bar
from matsciml.data.records import Record
from matsciml.data.split_build import default_workers, run_jobs, splits_written_atomically

COMPOSITION = {"Cu": 48, "Pd": 16, "Au": 16}
#: Å^3 per atom: EMT's pressure in the 1500 K liquid is near 0 (-1.0 +- 1.1 GPa over the shipped frames).
VOLUME_PER_ATOM = 16.7
TEMPERATURE = 1500.0  # K
MELT_TEMPERATURE = 2500.0  # K, erases the starting lattice
TIMESTEP = 4.0  # fs
FRICTION = 0.01  # 1/fs: a 100 fs thermostat time, longer than the force memory
MELT_STEPS = 75
EQUILIBRATION_STEPS = 75
FRAME_INTERVAL = 40  # steps, 160 fs
#: Longer trajectories are split in several, so each split samples several starting points.
MAX_FRAMES_PER_TRAJECTORY = 26
DEFAULT_FRAMES = {"train": 130, "val": 30, "test": 50}
_STREAM = 3  # keeps this builder's random streams apart from devset_builder's (1 and 2)


def _rng(seed: int, sid: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM, sid])


def initial_cell(rng: np.random.Generator) -> Atoms:
    """80 atoms of :data:`COMPOSITION` on random sites of a 3x3x3 fcc lattice scaled to the liquid's density."""
    symbols = [s for s, n in COMPOSITION.items() for _ in range(n)]
    length = (len(symbols) * VOLUME_PER_ATOM) ** (1 / 3)
    sites = bulk("Cu", "fcc", a=1.0, cubic=True).repeat(3).positions * (length / 3.0)
    chosen = np.sort(rng.choice(len(sites), len(symbols), replace=False))
    return Atoms(list(rng.permutation(symbols)), positions=sites[chosen], cell=[length] * 3, pbc=True)


def _langevin(atoms: Atoms, temperature: float, rng: np.random.Generator) -> Langevin:
    # fixcm=False: nothing anchors the liquid, and ASE deprecates fixcm=True
    return Langevin(
        atoms,
        TIMESTEP * units.fs,
        temperature_K=temperature,
        friction=FRICTION / units.fs,
        fixcm=False,
        rng=rng,
        logfile=None,
    )


def md_trajectory(seed: int, sid: int, num_frames: int) -> list[Record]:
    """Melt, equilibrate and sample one liquid trajectory; return its ``num_frames`` labelled frames.

    Args:
        seed: build seed.
        sid: trajectory id (also selects this trajectory's random stream).
        num_frames: frames to keep, :data:`FRAME_INTERVAL` MD steps apart.
    """
    rng = _rng(seed, sid)
    atoms = initial_cell(rng)
    atoms.calc = EMT()
    # Maxwell-Boltzmann momenta drawn here, from this trajectory's stream (as devset_builder does)
    sigma = np.sqrt(atoms.get_masses() * units.kB * MELT_TEMPERATURE)[:, None]
    atoms.set_momenta(sigma * rng.standard_normal((len(atoms), 3)))
    _langevin(atoms, MELT_TEMPERATURE, rng).run(MELT_STEPS)
    dynamics = _langevin(atoms, TEMPERATURE, rng)
    dynamics.run(EQUILIBRATION_STEPS)
    records = []
    for _ in range(num_frames):
        dynamics.run(FRAME_INTERVAL)
        frame = atoms.copy()
        frame.wrap()
        positions, energy, forces = emt.emt_labels(frame)
        frame.positions = positions
        record = emt.base_record(frame, sid)
        record.update(
            {
                K.FID: np.asarray(MELT_STEPS + dynamics.nsteps, dtype=np.int64),
                K.ENERGY: np.asarray(energy, dtype=np.float32),
                K.FORCES: forces.astype(np.float32),
            }
        )
        records.append(record)
    return records


def trajectory_plan(frames: dict[str, int]) -> list[tuple[str, int, int]]:
    """(split, sid, frames) per trajectory, in write order; sids run on across splits, never shared."""
    plan, sid = [], 0
    for split in DEVSET_SPLITS:
        count = frames[split]
        pieces = math.ceil(count / MAX_FRAMES_PER_TRAJECTORY)
        for index in range(pieces):  # as even as possible: 130 -> 5 x 26, 50 -> 2 x 25
            plan.append((split, sid, count // pieces + (index < count % pieces)))
            sid += 1
    return plan


def frame_correlation(records: list[Record]) -> dict[str, float]:
    """How alike consecutive frames of the same trajectory are.

    Returns:
        ``force_correlation``: sum of F(t).F(t+dt) over sum of |F|^2 (1: identical, 0: unrelated);
        ``rms_displacement``: root mean square atom displacement between the frames (Å,
        minimum image in the cubic cell); ``pairs``: frame pairs measured.
    """
    dot = norm = squared = 0.0
    pairs = atoms = 0
    for previous, current in zip(records[:-1], records[1:], strict=True):
        if int(previous[K.SID]) != int(current[K.SID]):
            continue
        f0, f1 = previous[K.FORCES].astype(np.float64), current[K.FORCES].astype(np.float64)
        dot += float((f0 * f1).sum())
        norm += 0.5 * float((f0 * f0).sum() + (f1 * f1).sum())
        lengths = np.diag(current[K.CELL]).astype(np.float64)
        step = current[K.POSITIONS].astype(np.float64) - previous[K.POSITIONS]
        squared += float(((step - lengths * np.round(step / lengths)) ** 2).sum())
        pairs, atoms = pairs + 1, atoms + len(step)
    if not pairs:
        raise ValueError("frame_correlation needs two consecutive frames of one trajectory (same sid)")
    return {"force_correlation": dot / norm, "rms_displacement": math.sqrt(squared / atoms), "pairs": pairs}


def _run(job: tuple[str, int, int, int]) -> list[Record]:
    _split, seed, sid, num_frames = job
    return md_trajectory(seed, sid, num_frames)


def _merge_frames(frames: dict | None) -> dict[str, int]:
    frames = {**DEFAULT_FRAMES, **(frames or {})}
    unknown = sorted(set(frames) - set(DEVSET_SPLITS))
    if unknown:
        raise ValueError(f"frames has unknown splits {unknown}; use {DEVSET_SPLITS}")
    for split, count in frames.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"frames[{split!r}] must be a positive integer, got {count!r}")
    return frames


def _source_text(seed: int) -> str:
    formula = "".join(f"{s}{n}" for s, n in COMPOSITION.items())
    return (
        f"Generated by matsciml.data.md_devset (seed {seed}) with ASE EMT: Langevin MD of liquid {formula}"
        f" in a cubic periodic cell ({VOLUME_PER_ATOM} Å^3/atom), melted at {MELT_TEMPERATURE:.0f} K, sampled"
        f" at {TEMPERATURE:.0f} K with a {TIMESTEP:g} fs step, one frame every {FRAME_INTERVAL * TIMESTEP:g} fs;"
        " energy = EMT total energy, forces on every atom, no fixed atoms; splits are separate trajectories."
    )


def build_md_devset(
    out: str | os.PathLike,
    seed: int = 0,
    overwrite: bool = False,
    frames: dict[str, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> None:
    """Generate ``out/{train,val,test}``, S2EF datasets of liquid-alloy MD frames.

    The three splits are written into a hidden folder beside ``out`` and moved into place
    together, so an interrupted build leaves the old devset (or nothing), never a mix.

    Args:
        out: output folder (``devsets/md`` for the shipped data).
        seed: build seed; the same seed gives identical records and content hashes.
        overwrite: replace an existing ``out``.
        frames: frames per split, e.g. ``{"train": 20}``; missing splits take :data:`DEFAULT_FRAMES`.
        workers: worker processes (default: up to 4, one per core); results do not depend on it.
        progress: show a progress bar.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False (checked before any work).
        ValueError: ``frames`` names an unknown split or a count below 1.
    """
    out = Path(out)
    frames = _merge_frames(frames)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite)")
    workers = default_workers() if workers is None else workers
    plan = trajectory_plan(frames)
    jobs = [(split, seed, sid, count) for split, sid, count in plan]
    shard_size = max(1, math.ceil(frames["train"] / 3))  # train in three shards, like OC20 S2EF
    start = time.perf_counter()
    with splits_written_atomically(out) as (partial, writers):
        for split in DEVSET_SPLITS:
            writers[split] = DatasetWriter(
                partial / split,
                task="s2ef",
                records_per_shard=shard_size,
                source=_source_text(seed),
                command=f"matsciml devset md --seed {seed}",
                title=f"matsciml EMT MD devset: liquid CuPdAu {split}",
                license="MIT (generated by matsciml, like its code)",
            )
        with progress_bar(unit="trajectories", disable=not progress) as bar:
            bar_task = bar.add_task("EMT MD", total=len(jobs))
            for (split, _, sid, _), records in zip(jobs, run_jobs(_run, jobs, workers), strict=True):
                for index, record in enumerate(records):
                    writers[split].add(record, f"md/{split} sid {sid}", index)  # validates
                bar.advance(bar_task)
    if progress:
        Console().print(f"built the MD devset in {out} in {time.perf_counter() - start:.1f} s")
