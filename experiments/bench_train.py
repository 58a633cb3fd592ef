"""Training throughput: one optimiser step per model and task, and our MegNet against matgl's MEGNet.

A training step is what Lightning runs for a batch: ``task.step(batch)`` (forward pass, forces
``-dE/dx`` with ``create_graph=True`` for S2EF, loss), ``loss.backward()`` and an Adam step.
It is timed on the first batches of the shipped devsets' train splits, collated before any
timing, after warm-up steps.

* **table**: EGNN, MegNet and Gala (and matgl's MEGNet when matgl is installed) on S2EF and
  IS2RE: ms/step, structures/s, atoms/s and peak memory. Each configuration runs in a fresh
  process, forked from this one, so no allocator or autograd state carries over; the
  configurations are visited in rounds (forward, then reverse order), so drifting load from
  other processes hits all of them alike, and figures are medians over all timed steps.
  Memory on CPU: the increase of the process's peak resident set size (VmHWM, reset
  just before the first step) over its resident size before that step; it covers the
  autograd graph, the gradients, Adam's state and allocator slack, not the model or the data.
  On CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the first step.
* **matgl**: our ``MegNet`` against matgl 4.1.2's (PyG) ``MEGNet`` at the same width and
  depth, in one process, on the same batches converted to matgl's graphs (same edges and
  periodic offsets, checked), steps alternating between the two models. S2EF: matgl's
  ``Potential`` (forces by autograd, ``create_graph`` in training) with the same L1
  energy + force loss; IS2RE: an energy-only step for both. Target: ours >= 1.5x faster.
  Parameters match to the element embedding's extra row for Z = 0; what still differs is
  the models' own: ours weights edges by a cosine envelope (weighted means, Set2Set over
  edges) and reads the head as an energy per atom; matgl also drops out the readout vector.
* **--profile**: our MegNet's S2EF step by phase, and operator self-time by kind for both
  models (torch.profiler, steps alternating).

Usage::

    python experiments/bench_train.py                  # table + matgl comparison (~3 min, 2-core VM)
    python experiments/bench_train.py --quick          # smoke run (< 1 min)
    python experiments/bench_train.py --profile        # and where MegNet's step spends its time
    python experiments/bench_train.py --device cuda     # on a GPU machine
    python experiments/bench_train.py --models egnn --tasks s2ef --no-compare --max-neighbors 50  # capped graphs
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from matsciml.data.batch import Batch
from matsciml.data.datamodules import IS2REDataModule, S2EFDataModule
from matsciml.models import EGNN, Gala, MegNet
from matsciml.tasks.is2re import IS2RETask
from matsciml.tasks.s2ef import S2EFTask

try:  # optional: the comparison and the matgl rows need matgl 4.x (PyG backend)
    import matgl
    from matgl.apps.pes import Potential
    from matgl.graph._compute import compute_pair_vector_and_distance
    from matgl.layers import BondExpansion
    from matgl.models import MEGNet
    from torch_geometric.data import Batch as PygBatch
    from torch_geometric.data import Data as PygData
except ImportError:  # pragma: no cover - depends on the environment
    matgl = None

MODELS: dict[str, type] = {"egnn": EGNN, "megnet": MegNet, "gala": Gala}
TASKS = {"s2ef": (S2EFDataModule, S2EFTask), "is2re": (IS2REDataModule, IS2RETask)}
# radius-graph settings of the data modules (--max-neighbors); set before the children are forked
GRAPH: dict[str, Any] = {}
MATGL = "matgl-megnet"
MiB = 1024 * 1024


# -- memory ------------------------------------------------------------------------------
def _proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _max_rss() -> int:
    """ru_maxrss in bytes (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak memory of the enclosed steps above the level when entered (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.increase: int | None = None
        self.how = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.how = "cuda max_memory_allocated"
        else:
            self.base = _proc_status("VmRSS")
            self.exact = self.base is not None and _reset_peak_rss()
            if self.base is None:  # no /proc: compare high-water marks
                self.base = _max_rss()
            self.how = "peak RSS (VmHWM)" if self.exact else "ru_maxrss high-water mark"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status("VmHWM") if self.exact else None
            peak = _max_rss() if peak is None else peak
        self.increase = max(0, peak - self.base)


# -- data and steps ----------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_batches(
    task: str, batch_size: int, count: int, representation: str, device: torch.device
) -> tuple[list[Batch], Any]:
    """The first ``count`` batches of the devset's train split, collated, on ``device``."""
    graph = GRAPH if representation == "graph" else {}
    datamodule = TASKS[task][0].from_devset(
        batch_size=batch_size, representation=representation, shuffle=False, **graph
    )
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch.to(device))
        if len(batches) == count:
            break
    return batches, datamodule


def make_task(model_name: str, task: str, datamodule: Any, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    lit = TASKS[task][1](MODELS[model_name](), statistics=datamodule.target_statistics, species=datamodule.species)
    return lit.to(device).train()


def our_step(task: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Batch], None]:
    """Lightning's automatic optimisation of one batch, without the logging."""

    def step(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.step(batch)
        loss.backward()
        optimizer.step()

    return step


# -- matgl -------------------------------------------------------------------------------
def build_matgl_megnet(ours: MegNet) -> torch.nn.Module:
    """matgl's MEGNet with the width, depth, readout and distance expansion of ``ours``.

    Our learned initial state (a ``state_dim`` vector shared by all structures) is matgl's
    state embedding with one state type; our atomic-number embedding is matgl's node
    embedding over the elements Z = 1..num_species. matgl's Gaussians are
    ``exp(-width (r - mu)^2)``, ours ``exp(-((r - mu) / sigma)^2)``: ``width = 1 / sigma^2``.
    """
    from ase.data import chemical_symbols

    a = ours.spec()["init_args"]
    if a["activation"] != "softplus":
        raise ValueError("the comparison uses the shifted softplus of both models")
    return MEGNet(
        dim_node_embedding=a["node_dim"],
        dim_edge_embedding=a["num_gaussians"],
        dim_state_embedding=a["state_dim"],
        ntypes_state=1,
        include_state=True,
        nblocks=a["num_blocks"],
        hidden_layer_sizes_input=tuple(a["dense_sizes"]),
        hidden_layer_sizes_conv=tuple(a["conv_sizes"]),
        hidden_layer_sizes_output=tuple(a["output_sizes"]),
        nlayers_set2set=a["set2set_layers"],
        niters_set2set=a["set2set_steps"],
        activation_type="softplus2",
        dropout=a["dropout"],
        element_types=tuple(chemical_symbols[1 : a["num_species"] + 1]),
        cutoff=a["cutoff"],
        bond_expansion=BondExpansion(
            rbf_type="Gaussian",
            initial=0.0,
            final=a["cutoff"],
            num_centers=a["num_gaussians"],
            width=1.0 / a["gaussian_width"] ** 2,
        ),
    )


def to_matgl(batch: Batch) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``(graph, lattices, state_attr)`` as matgl's ``collate_fn_pes`` would give for ``batch``.

    Same edges and image offsets: ours are ``(j, i)`` = (neighbour, centre) with vector
    ``x_j - x_i + S @ cell``; matgl's are ``(src, dst)`` with vector ``x_dst + offset @ lattice
    - x_src`` and messages aggregated into ``src``, so ``src = i``, ``dst = j``, ``offset = S``.
    Positions enter as fractional coordinates, from which ``Potential`` rebuilds them.
    """
    j, i = batch.edge_index
    edge_structure = batch.structure_index[i]
    if not bool((edge_structure[1:] >= edge_structure[:-1]).all()):
        raise ValueError("edges are not grouped by structure")
    edge_ptr = torch.zeros(batch.num_structures + 1, dtype=torch.long, device=j.device)
    edge_ptr[1:] = torch.bincount(edge_structure, minlength=batch.num_structures).cumsum(0)
    graphs = []
    for s in range(batch.num_structures):
        lo, hi = int(batch.ptr[s]), int(batch.ptr[s + 1])
        elo, ehi = int(edge_ptr[s]), int(edge_ptr[s + 1])
        cell = batch.cell[s].double()
        frac = batch.positions[lo:hi].double() @ torch.linalg.inv(cell)
        graphs.append(
            PygData(
                num_nodes=hi - lo,
                edge_index=torch.stack([i[elo:ehi] - lo, j[elo:ehi] - lo]),
                pbc_offset=batch.cell_shifts[elo:ehi].to(matgl.float_th),
                node_type=batch.atomic_numbers[lo:hi] - 1,
                frac_coords=frac.to(matgl.float_th),
            )
        )
    graph = PygBatch.from_data_list(graphs)
    state = torch.zeros(batch.num_structures, dtype=torch.long, device=j.device)  # the one state type
    return graph, batch.cell.to(matgl.float_th), state


def check_same_graph(batch: Batch, converted: tuple) -> float:
    """Largest difference (Å) between our edge lengths and matgl's for the converted batch."""
    graph, lattices, _ = converted
    positions = (graph.frac_coords.unsqueeze(-1) * lattices[graph.batch]).sum(dim=1)
    offsets = (graph.pbc_offset.unsqueeze(-1) * lattices[graph.batch[graph.edge_index[0]]]).sum(dim=1)
    _, theirs = compute_pair_vector_and_distance(positions, graph.edge_index, offsets)
    ours = MegNet.edge_vectors(batch).norm(dim=-1)
    if theirs.shape != ours.shape:
        raise ValueError(f"edge counts differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}")
    return float((theirs - ours).abs().max())


class MatglTrainer:
    """matgl's MEGNet trained on ``task``'s batches with the same loss as our ``task``."""

    def __init__(self, ours: torch.nn.Module, device: torch.device):
        self.ours = ours  # our task: loss coefficients and normaliser scale
        torch.manual_seed(0)
        self.model = build_matgl_megnet(ours.model)
        scale, mean = float(ours.energy_scale), float(ours.mean_energy)
        self.forces = isinstance(ours, S2EFTask)
        # Potential: forces -dE/dpos by autograd, create_graph=True in training mode
        self.module = (
            Potential(self.model, data_mean=mean, data_std=scale, calc_forces=True, calc_stresses=False)
            if self.forces
            else self.model
        )
        self.module.to(device).train()
        self.scale, self.mean, self.device = scale, mean, device
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=ours.lr)

    def convert(self, batch: Batch) -> tuple[Batch, tuple]:
        graph, lattices, state = to_matgl(batch)
        return batch, (graph.to(self.device), lattices, state)

    def step(self, item: tuple[Batch, tuple]) -> None:
        batch, (graph, lattices, state) = item
        # cuDNN's LSTM has no double backward (force training); our Set2Set turns it off too
        with torch.backends.cudnn.flags(enabled=self.device.type != "cuda" or not self.forces):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(batch, graph, lattices, state)
            loss.backward()
            self.optimizer.step()

    def _loss(self, batch: Batch, graph: Any, lattices: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        scale, task = self.scale, self.ours
        if self.forces:
            energy, forces, _, _ = self.module(g=graph, lat=lattices, state_attr=state)
            natoms = batch.natoms.to(energy.dtype)
            loss = task.energy_coefficient * F.l1_loss(energy / natoms / scale, batch.energy / natoms / scale)
            free = ~batch.fixed
            return loss + task.force_coefficient * F.l1_loss(forces[free] / scale, batch.forces[free] / scale)
        # matgl's ModelLightningModule.forward: positions and offsets from the lattice, then the model
        graph = copy.copy(graph)  # shallow, as Potential does
        graph.pos = (graph.frac_coords.unsqueeze(-1) * lattices[graph.batch]).sum(dim=1)
        graph.pbc_offshift = (graph.pbc_offset.unsqueeze(-1) * lattices[graph.batch[graph.edge_index[0]]]).sum(dim=1)
        energy = scale * self.module(graph, state_attr=state) + self.mean
        return F.l1_loss(energy / scale, batch.relaxed_energy / scale)


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# -- the children ------------------------------------------------------------------------
def run_config(cfg: dict) -> dict:
    """Time one model x task configuration (in a fresh process)."""
    device = torch.device(cfg["device"])
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    model_name, task_name = cfg["model"], cfg["task"]
    representation = "point_cloud" if model_name == "gala" else "graph"
    batches, datamodule = load_batches(
        task_name, cfg["batch_size"], cfg["warmup"] + cfg["steps"], representation, device
    )
    task = make_task("megnet" if model_name == MATGL else model_name, task_name, datamodule, device)
    if model_name == MATGL:
        trainer = MatglTrainer(task, device)
        items, step, params = [trainer.convert(b) for b in batches], trainer.step, trainable(trainer.module)
    else:
        optimizer = torch.optim.Adam(task.parameters(), lr=task.lr)
        items, step, params = batches, our_step(task, optimizer), trainable(task)
    times, structures, atoms = [], [], []
    with PeakMemory(device) as memory:
        for k in range(cfg["warmup"] + cfg["steps"]):
            index = k % len(batches)
            _sync(device)
            start = time.perf_counter()
            step(items[index])
            _sync(device)
            if k >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
                structures.append(batches[index].num_structures)
                atoms.append(batches[index].num_atoms)
    return {
        "times": times,
        "structures": structures,
        "atoms": atoms,
        "params": params,
        "batch_atoms": statistics.mean(b.num_atoms for b in batches),
        "edges": statistics.mean(b.num_edges for b in batches) if representation == "graph" else None,
        "memory": memory.increase,
        "memory_how": memory.how,
    }


def run_compare(cfg: dict) -> dict:
    """Our MegNet and matgl's MEGNet on the same batches, steps alternating (in a fresh process)."""
    device = torch.device(cfg["device"])
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    out = {}
    for task_name in cfg["tasks"]:
        batches, datamodule = load_batches(task_name, cfg["batch_size"], cfg["warmup"] + cfg["steps"], "graph", device)
        task = make_task("megnet", task_name, datamodule, device)
        ours = our_step(task, torch.optim.Adam(task.parameters(), lr=task.lr))
        trainer = MatglTrainer(task, device)
        converted = [trainer.convert(b) for b in batches]
        mismatch = max(check_same_graph(b, c[1]) for b, c in zip(batches, converted, strict=True))
        if mismatch > 1e-4:
            raise RuntimeError(f"matgl's graphs differ from ours by {mismatch:.2e} Å")
        times: dict[str, list[float]] = {"ours": [], "matgl": []}
        for k in range(cfg["warmup"] + cfg["steps"]):
            index = k % len(batches)
            runs = [("ours", ours, batches[index]), ("matgl", trainer.step, converted[index])]
            for name, step, item in runs if k % 2 == 0 else runs[::-1]:
                _sync(device)
                start = time.perf_counter()
                step(item)
                _sync(device)
                if k >= cfg["warmup"]:
                    times[name].append(time.perf_counter() - start)
        out[task_name] = {
            "times": times,
            "params": (trainable(task), trainable(trainer.module)),
            "mismatch": mismatch,
            "structures": statistics.mean(b.num_structures for b in batches),
            "atoms": statistics.mean(b.num_atoms for b in batches),
            "edges": statistics.mean(b.num_edges for b in batches),
        }
    return out


#: torch.profiler operators by kind, for the per-category comparison
CATEGORIES = {
    "matmul (mm, addmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "softplus, sigmoid, lt and their backwards": (
        "aten::softplus",
        "aten::softplus_backward",
        "aten::sigmoid",
        "aten::sigmoid_backward",
        "aten::lt",
    ),
    "mul": ("aten::mul",),
    "add, sub, div, neg": ("aten::add", "aten::add_", "aten::sub", "aten::div", "aten::neg"),
    "gathers and scatters": (
        "aten::index",
        "aten::index_add",
        "aten::index_add_",
        "aten::_index_put_impl_",
        "aten::index_select",
        "aten::scatter_add_",
        "aten::scatter_reduce",
        "aten::scatter_add",
        "aten::scatter_reduce_",
        "aten::gather",
    ),
    "copy, cat, fill": ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_"),
    "dropout (bernoulli)": ("aten::bernoulli_",),
}


def run_profile(cfg: dict) -> dict:
    """Where our MegNet's S2EF step spends its time (and matgl's, if installed), on CPU."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(cfg["device"])
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    batches, datamodule = load_batches("s2ef", cfg["batch_size"], cfg["warmup"] + cfg["steps"], "graph", device)
    task = make_task("megnet", "s2ef", datamodule, device)
    optimizer = torch.optim.Adam(task.parameters(), lr=task.lr)
    steps: dict[str, tuple[Callable, list]] = {"ours": (our_step(task, optimizer), batches)}
    if matgl is not None:
        trainer = MatglTrainer(task, device)
        steps["matgl"] = (trainer.step, [trainer.convert(b) for b in batches])
    for step, items in steps.values():
        for item in items[: cfg["warmup"]]:
            step(item)
    phases: dict[str, list[float]] = {
        "forward (energy)": [],
        "forces (grad, create_graph)": [],
        "loss + backward": [],
        "Adam": [],
    }
    for batch in batches[cfg["warmup"] :]:
        # S2EFTask.step split into its parts (the same operations; the metrics are left out)
        marks = [time.perf_counter()]
        optimizer.zero_grad(set_to_none=True)
        positions = batch.positions.detach().requires_grad_(True)
        energy = task.energy(batch.replace(positions=positions))
        _sync(device)
        marks.append(time.perf_counter())
        (gradient,) = torch.autograd.grad(energy.sum(), [positions], create_graph=True)
        _sync(device)
        marks.append(time.perf_counter())
        scale, natoms, free = task.energy_scale, batch.natoms.to(energy.dtype), ~batch.fixed
        loss = task.energy_coefficient * F.l1_loss(energy / natoms / scale, batch.energy / natoms / scale)
        loss = loss + task.force_coefficient * F.l1_loss(-gradient[free] / scale, batch.forces[free] / scale)
        loss.backward()
        _sync(device)
        marks.append(time.perf_counter())
        optimizer.step()
        _sync(device)
        marks.append(time.perf_counter())
        for name, a, b in zip(phases, marks[:-1], marks[1:], strict=True):
            phases[name].append(b - a)
    # operator self-times, one profiled step at a time, alternating between the models
    per_step: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    table = ""
    for k in range(cfg["warmup"], len(batches)):
        names = list(steps) if k % 2 == 0 else list(steps)[::-1]
        for name in names:
            step, items = steps[name]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(items[k])
            averages = prof.key_averages()
            if name == "ours":
                table = averages.table(sort_by="self_cpu_time_total", row_limit=cfg["rows"], max_name_column_width=40)
            total = sum(a.self_cpu_time_total for a in averages)
            sums = {c: sum(a.self_cpu_time_total for a in averages if a.key in ops) for c, ops in CATEGORIES.items()}
            sums["other"] = total - sum(sums.values())
            sums["total"] = total
            per_step[name].append({c: value / 1e3 for c, value in sums.items()})
    categories = {
        name: {c: statistics.median(row[c] for row in rows) for c in rows[0]} for name, rows in per_step.items()
    }
    return {
        "phases": {k: statistics.median(v) for k, v in phases.items()},
        "categories": categories,
        "table": table,
        "steps": len(batches) - cfg["warmup"],
    }


def _child(target: Callable[[dict], Any], cfg: dict, conn: Any) -> None:
    try:
        conn.send(("ok", target(cfg)))
    except BaseException:  # report, so the parent can go on with the other configurations
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_fresh_process(target: Callable[[dict], Any], cfg: dict) -> Any:
    """``target(cfg)`` in a new process: forked on CPU (imports done once), spawned for CUDA."""
    method = "fork" if cfg["device"] == "cpu" and "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(target, cfg, send))
    process.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        status, value = "error", "the process died (out of memory?)"
    process.join()
    if status == "error":
        raise RuntimeError(value)
    return value


# -- the parent --------------------------------------------------------------------------
def median_rates(res: dict) -> tuple[float, float, float]:
    """Median ms/step, structures/s and atoms/s over the timed steps."""
    times = res["times"]
    return (
        1e3 * statistics.median(times),
        statistics.median(s / t for s, t in zip(res["structures"], times, strict=True)),
        statistics.median(a / t for a, t in zip(res["atoms"], times, strict=True)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core VM, 2 threads stall when another process is busy)",
    )
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated from {','.join([*MODELS, MATGL])} (default: all; {MATGL} if installed)",
    )
    parser.add_argument("--tasks", default="s2ef,is2re", help="comma-separated from s2ef,is2re")
    parser.add_argument("--batch-size", type=int, default=8, help="structures per batch (EGNN, MegNet, matgl)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="passes over all configurations (fresh processes)")
    parser.add_argument("--gala-batch-size", type=int, default=4, help="Gala's batch (its cost grows as B*M^3)")
    parser.add_argument("--gala-steps", type=int, default=3, help="Gala's timed steps per round")
    parser.add_argument("--compare-steps", type=int, default=8, help="timed steps of each model in the comparison")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison with matgl")
    parser.add_argument("--profile", action="store_true", help="also profile our MegNet's S2EF step")
    parser.add_argument(
        "--max-neighbors",
        type=int,
        default=None,
        help="neighbour cap of the radius graphs (default: none, as the data modules)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, one round, small Gala batch")
    args = parser.parse_args()
    GRAPH["max_neighbors"] = args.max_neighbors
    sys.stdout.reconfigure(line_buffering=True)  # keep stdout in order with the children's progress on stderr
    if args.quick:
        args.steps, args.warmup, args.rounds = 2, 1, 1
        args.gala_batch_size, args.gala_steps, args.compare_steps = 2, 1, 2
    models = (
        [m.strip() for m in args.models.split(",")]
        if args.models
        else [*MODELS, *([MATGL] if matgl is not None else [])]
    )
    tasks = [t.strip() for t in args.tasks.split(",")]
    for name in models:
        if name not in MODELS and name != MATGL:
            parser.error(f"unknown model {name!r}")
        if name == MATGL and matgl is None:
            parser.error("matgl is not installed (pip install matgl==4.1.2 -c constraints.txt)")
    for name in tasks:
        if name not in TASKS:
            parser.error(f"unknown task {name!r}")
    if args.device == "cuda":  # checked in a child: CUDA must not be initialised before forking
        if not in_fresh_process(_cuda_available, {"device": "cuda"}):
            parser.error("--device cuda: torch.cuda.is_available() is False")
    elif args.device != "cpu":
        parser.error("--device must be cpu or cuda")

    threads = f"{args.threads} thread(s)" if args.device == "cpu" else "CUDA"
    print(
        f"torch {torch.__version__}, {args.device}, {threads}, {os.cpu_count()} CPUs visible"
        + (f", matgl {matgl.__version__}" if matgl is not None else ", matgl not installed")
    )
    print(
        f"step = task.step (forward, forces for S2EF, loss) + backward + Adam; devset train batches, "
        f"collated beforehand; {args.warmup} warm-up steps; medians over {args.rounds} round(s)"
    )
    if "gala" in models:
        print(
            f"Gala: batch {args.gala_batch_size} and {args.gala_steps} timed steps per round "
            f"(not {args.batch_size} and {args.steps}: its cost grows as B*M^3); it sees point clouds "
            "(adsorbate + surface + 8 sub-surface atoms), so its atoms/batch are fewer"
        )

    base = {"device": args.device, "threads": args.threads}
    configs = []
    for model in models:
        for task in tasks:
            gala = model == "gala"
            configs.append(
                {
                    **base,
                    "model": model,
                    "task": task,
                    "batch_size": args.gala_batch_size if gala else args.batch_size,
                    "steps": args.gala_steps if gala else args.steps,
                    "warmup": 1 if gala else args.warmup,
                }
            )
    start = time.perf_counter()
    results: dict[tuple[str, str], dict] = {}
    for round_index in range(args.rounds):
        for cfg in configs if round_index % 2 == 0 else configs[::-1]:
            key = (cfg["model"], cfg["task"])
            try:
                res = in_fresh_process(run_config, cfg)
            except RuntimeError as err:
                print(f"  {key[0]}/{key[1]} failed:\n{err}", file=sys.stderr)
                continue
            merged = results.setdefault(key, {**res, "times": [], "structures": [], "atoms": [], "memory": 0})
            for field in ("times", "structures", "atoms"):
                merged[field] += res[field]
            merged["memory"] = max(merged["memory"], res["memory"] or 0)
            print(
                f"  round {round_index + 1}/{args.rounds}: {key[0]:<12} {key[1]:<5} "
                f"{1e3 * statistics.median(res['times']):8.1f} ms/step",
                file=sys.stderr,
                flush=True,
            )

    if results:
        how = next(iter(results.values()))["memory_how"]
        mem_label = "peak mem MiB" + (" (CUDA)" if args.device == "cuda" else "")
        print(
            f"\n| model | task | batch | atoms/batch | edges/batch | params | ms/step | structures/s | atoms/s "
            f"| {mem_label} |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for cfg in configs:
            key = (cfg["model"], cfg["task"])
            if key not in results:
                print(f"| {key[0]} | {key[1]} | failed |")
                continue
            res = results[key]
            ms, structures, atoms = median_rates(res)
            edges = f"{res['edges']:,.0f}" if res["edges"] is not None else "-"
            print(
                f"| {key[0]} | {key[1]} | {cfg['batch_size']} | {res['batch_atoms']:.0f} | {edges} "
                f"| {res['params']:,} | {ms:,.1f} | {structures:,.1f} | {atoms:,.0f} | {res['memory'] / MiB:,.0f} |"
            )
        print(
            f"(peak memory: {how} during warm-up and timed steps, minus the level before the first step; "
            "the largest over rounds)"
        )
        print(f"(timing: {time.perf_counter() - start:.0f} s)")

    if not args.no_compare and matgl is not None:
        compare(args, base)
    elif not args.no_compare:
        print("\nmatgl is not installed: no comparison (pip install matgl==4.1.2 -c constraints.txt)")
    if args.profile:
        profile_megnet(args, base)


def _cuda_available(cfg: dict) -> bool:
    return torch.cuda.is_available()


def compare(args: argparse.Namespace, base: dict) -> None:
    print(f"\n== our MegNet vs matgl {matgl.__version__} MEGNet: same batches, steps alternating in one process")
    cfg = {
        **base,
        "tasks": [t for t in ("s2ef", "is2re") if t in args.tasks.split(",")],
        "batch_size": args.batch_size,
        "steps": args.compare_steps,
        "warmup": args.warmup,
    }
    try:
        out = in_fresh_process(run_compare, cfg)
    except RuntimeError as err:
        print(f"comparison failed:\n{err}")
        return
    for task_name, res in out.items():
        ours_params, matgl_params = res["params"]
        ours_t, matgl_t = res["times"]["ours"], res["times"]["matgl"]
        ours_ms, matgl_ms = 1e3 * statistics.median(ours_t), 1e3 * statistics.median(matgl_t)
        pair = statistics.median(m / o for m, o in zip(matgl_t, ours_t, strict=True))
        step = (
            "energy + forces (create_graph), L1 energy + force loss" if task_name == "s2ef" else "energy only, L1 loss"
        )
        print(
            f"{task_name}: {step}; batch {args.batch_size} ({res['atoms']:.0f} atoms, {res['edges']:,.0f} edges), "
            f"{len(ours_t)} steps each; edge lengths agree to {res['mismatch']:.1e} Å"
        )
        print(f"  trainable parameters: ours {ours_params:,}, matgl {matgl_params:,}")
        print(f"  ours  {ours_ms:8.1f} ms/step  ({res['structures'] / ours_ms * 1e3:6.1f} structures/s)")
        print(f"  matgl {matgl_ms:8.1f} ms/step  ({res['structures'] / matgl_ms * 1e3:6.1f} structures/s)")
        verdict = ""
        if task_name == "s2ef":
            verdict = f"  (target >= 1.5x: {'MET' if matgl_ms / ours_ms >= 1.5 else 'MISSED'})"
        print(
            f"  speed-up ours vs matgl: {matgl_ms / ours_ms:.2f}x (ratio of medians), "
            f"{pair:.2f}x (median of per-batch ratios){verdict}"
        )


def profile_megnet(args: argparse.Namespace, base: dict) -> None:
    print("\n== profile: our MegNet's S2EF step" + (" (and matgl's)" if matgl is not None else ""))
    if args.device != "cpu":
        print("(CPU only)")
        return
    cfg = {**base, "batch_size": args.batch_size, "steps": 2 if args.quick else 6, "warmup": args.warmup, "rows": 15}
    try:
        out = in_fresh_process(run_profile, cfg)
    except RuntimeError as err:
        print(f"profile failed:\n{err}")
        return
    total = sum(out["phases"].values())
    print(f"phases of our step (median of {out['steps']}):")
    for name, seconds in out["phases"].items():
        print(f"  {name:<30} {1e3 * seconds:8.1f} ms  {100 * seconds / total:5.1f}%")
    categories = out["categories"]
    print(f"operator self-time per step by kind (torch.profiler; medians of {out['steps']} steps each, alternating):")
    print(f"  {'kind':<45}" + "".join(f"{name:>12}" for name in categories))
    for kind in next(iter(categories.values())):
        print(f"  {kind:<45}" + "".join(f"{row[kind]:9.1f} ms" for row in categories.values()))
    print("our top operators (one step):")
    print(out["table"])


if __name__ == "__main__":
    main()
