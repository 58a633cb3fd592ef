"""Eager against ``torch.compile`` (the task's ``compile`` option), per model, on devset batches.

Three passes are timed, the ones ``compile`` affects:

* **IS2RE train step**: forward, L1 loss, backward, Adam step (energy only, so compiled);
* **S2EF evaluation**: energies and forces (``-dE/dx``, one backward) as validation and
  predict run them, under ``torch.inference_mode``;
* **S2EF train step**: energies and forces, energy + force L1 loss, backward, Adam step. Plain
  ``compile`` runs it eagerly (no double backward under torch.compile); ``compile: {forces: true}``
  compiles energy and forces traced as one graph (:mod:`matsciml.tasks.compiled_forces`).

Each configuration runs eager and compiled in the same process on the same
collated batches, interleaved round by round, after a warm-up that includes compilation (whose
time is printed separately). Usage::

    .venv/bin/python experiments/bench_compile.py                 # EGNN and MegNet, inductor (~3 min)
    .venv/bin/python experiments/bench_compile.py --models egnn --device cuda
    .venv/bin/python experiments/bench_compile.py --passes s2ef-train    # one pass only
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from matsciml.data.datamodules import IS2REDataModule, S2EFDataModule
from matsciml.models import EGNN, MegNet
from matsciml.tasks import IS2RETask, S2EFTask

MODELS = {"egnn": EGNN, "megnet": MegNet}
PASSES = ("is2re-train", "s2ef-eval", "s2ef-train")


def batches_of(module, batch_size: int, count: int, device: torch.device) -> tuple[list, dict]:
    datamodule = module.from_devset(batch_size=batch_size, shuffle=False)
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    return [next(loader).to(device) for _ in range(count)], datamodule.target_statistics


def timed(fn, batches, device: torch.device) -> list[float]:
    times = []
    for batch in batches:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def train_step(task):
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-4)  # small: weights stay comparable

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        task.step(batch)[0].backward()
        optimizer.step()

    return step


def evaluate(task):
    def run(batch):
        with torch.inference_mode():
            task(batch)

    return run


def compare(name: str, make_task, make_fn, batches, rounds: int, device: torch.device) -> dict:
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        task = make_task(compiled).to(device)
        fn = make_fn(task)
        start = time.perf_counter()
        timed(fn, batches[:2], device)  # warm-up; compiled: tracing and code generation
        runs[compiled] = {"fn": fn, "warmup": time.perf_counter() - start, "times": []}
    for _ in range(rounds):
        for run in runs.values():
            run["times"] += timed(run["fn"], batches, device)
    eager, compiled = (statistics.median(runs[c]["times"]) * 1e3 for c in (False, True))
    print(
        f"{name:28s} eager {eager:8.1f} ms   compiled {compiled:8.1f} ms   speed-up {eager / compiled:5.2f}x"
        f"   (compile warm-up {runs[True]['warmup']:.0f} s)",
        flush=True,
    )
    return {"eager_ms": eager, "compiled_ms": compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options = {"backend": args.backend}
    forces = {**options, "forces": True}  # S2EF training compiled too
    print(
        f"torch {torch.__version__}, {args.threads} threads, device {device}, backend {args.backend}, "
        f"batch {args.batch_size}, {args.batches} batches x {args.rounds} rounds"
    )
    is2re, is2re_stats = batches_of(IS2REDataModule, args.batch_size, args.batches, device)
    s2ef, s2ef_stats = batches_of(S2EFDataModule, args.batch_size, args.batches, device)
    for model in args.models:
        cls = MODELS[model]
        if "is2re-train" in args.passes:
            compare(
                f"{model} IS2RE train step",
                lambda c, cls=cls: IS2RETask(cls(), statistics=is2re_stats, compile=options if c else False).train(),
                train_step,
                is2re,
                args.rounds,
                device,
            )
        if "s2ef-eval" in args.passes:
            compare(
                f"{model} S2EF energy+forces",
                lambda c, cls=cls: S2EFTask(cls(), statistics=s2ef_stats, compile=options if c else False).eval(),
                evaluate,
                s2ef,
                args.rounds,
                device,
            )
        if "s2ef-train" in args.passes:
            compare(
                f"{model} S2EF train step",
                lambda c, cls=cls: S2EFTask(cls(), statistics=s2ef_stats, compile=forces if c else False).train(),
                train_step,
                s2ef,
                args.rounds,
                device,
            )
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
