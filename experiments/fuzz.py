"""Long seeded fuzz runs of the decoders and loaders (issue 13); the short runs are tests/fuzz.

Each target (tests/helpers/fuzz.py) gets ``--minutes`` of a seeded loop: pick a valid seed input
(or, one time in ten, arbitrary bytes), apply 1-6 random mutations (tests/helpers/mutations.py), feed
it to the loader. The contract: success or one of the project's error types, within the per-input
time limit, under an address-space limit (``--memory-gib`` above what the process holds after its
imports), so a header that claims a huge array fails as a MemoryError finding instead of swapping.

Every finding (another exception, a hang, a MemoryError) is saved to ``--out/<target>/<sha>.bin``
with a ``.txt`` holding the traceback and the mutation list that made it; the exit status is 1 if
there was any. Prints, per target: executions, outcomes, distinct errors, findings, peak RSS.

Usage::

    python experiments/fuzz.py --minutes 3                       # every target, 3 minutes each
    python experiments/fuzz.py --minutes 30 --target oc20 --seed 7
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import random
import re
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fuzz targets and mutators live with the test helpers

from helpers import mutations  # noqa: E402
from helpers.fuzz import TARGETS, FuzzTimeout, Target, run  # noqa: E402

#: An input that raises the peak RSS by more than this is a finding (memory bounded by the input).
MEMORY_FINDING_MIB = 256


def limit_memory(headroom_gib: float) -> int:
    """Cap the address space at what the process maps now plus ``headroom_gib``; returns the cap in bytes."""
    with open("/proc/self/status") as status:
        mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    cap = mapped + int(headroom_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap


def _input(rng: random.Random, seeds: list[bytes]) -> tuple[bytes, str]:
    """One input and how it was made (for the finding's report)."""
    if rng.random() < 0.1:
        data = rng.randbytes(rng.choice((0, 1, 8, 64, 512, 4096)))
        return data, f"arbitrary {len(data)} bytes"
    index = rng.randrange(len(seeds))
    ops = mutations.random_mutations(rng)
    return mutations.apply(seeds[index], ops), f"seed {index}, mutations {ops!r}"


def _where(err: BaseException) -> str:
    """The innermost matsciml frame of a traceback: findings with the same cause share it."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/matsciml/" in f.filename]
    frame = frames[-1] if frames else traceback.extract_tb(err.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fuzz(target: Target, seconds: float, seed: int, out: Path) -> dict:
    """Run ``target`` for ``seconds``; returns the figures printed in the summary.

    Findings: an exception outside the project's errors, a hang, an input that raised the peak RSS by
    more than :data:`MEMORY_FINDING_MIB`, an exception CPython could only print (``sys.unraisablehook``).
    """
    rng = random.Random(f"{seed}:{target.name}")
    seeds = target.seeds()
    outcomes: collections.Counter[str] = collections.Counter()
    errors: set[str] = set()
    findings: dict[str, int] = {}
    unraisable: list[str] = []
    sys.unraisablehook = lambda hook_args: unraisable.append(
        f"{type(hook_args.exc_value).__name__}: {hook_args.exc_value}"
    )
    deadline, executions = time.monotonic() + seconds, 0
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target.name}-") as workdir:
        while time.monotonic() < deadline:
            data, how = _input(rng, seeds)
            executions += 1
            peak, printed = _peak_rss_mib(), len(unraisable)
            problem: BaseException | None = None
            try:
                refusal = run(target, data, Path(workdir))
            except (Exception, FuzzTimeout) as err:  # every other exception is what we are looking for
                problem, key = err, f"{type(err).__name__} at {_where(err)}"
            else:
                if (grown := _peak_rss_mib() - peak) > MEMORY_FINDING_MIB:
                    problem, key = MemoryError(f"peak RSS grew by {grown:.0f} MiB"), "memory"
                elif len(unraisable) > printed:
                    problem, key = RuntimeError(unraisable[-1]), f"unraisable {unraisable[-1][:60]}"
            if problem is None:
                outcomes[type(refusal).__name__ if refusal else "ok"] += 1
                if refusal is not None:  # the message without the paths and numbers in it
                    errors.add(re.sub(r"\d+", "N", str(refusal).replace(workdir, ""))[:90])
                continue
            outcomes["finding"] += 1
            if key not in findings:
                _save(out / target.name, data, how, problem)
                print(f"  finding: {key}: {str(problem)[:200]}", flush=True)
            findings[key] = findings.get(key, 0) + 1
    sys.unraisablehook = sys.__unraisablehook__
    return {"executions": executions, "outcomes": dict(outcomes), "errors": sorted(errors), "findings": findings}


def _save(folder: Path, data: bytes, how: str, err: BaseException) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(data).hexdigest()[:16]
    (folder / f"{name}.bin").write_bytes(data)
    report = "".join(traceback.format_exception(err))
    (folder / f"{name}.txt").write_text(f"{how}\n\n{report}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="minutes per target")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeat for several (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="folder for failing inputs")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="address space allowed beyond the imports")
    args = parser.parse_args(argv)

    names = args.target or sorted(TARGETS)
    for name in names:  # build every seed before the memory cap (building a task maps a lot)
        TARGETS[name].seeds()
    cap = limit_memory(args.memory_gib)
    print(f"seed {args.seed}, {args.minutes} min per target, address space capped at {cap / (1 << 30):.1f} GiB")
    total = 0
    for name in names:
        print(f"{name}:", flush=True)
        figures = fuzz(TARGETS[name], args.minutes * 60, args.seed, args.out)
        total += sum(figures["findings"].values())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"  {figures['executions']} executions, outcomes {figures['outcomes']}, "
            f"{len(figures['errors'])} distinct refusals, {len(figures['findings'])} distinct findings, "
            f"peak RSS {rss:.0f} MiB",
            flush=True,
        )
    print(f"{total} failing inputs" + (f", saved under {args.out}" if total else ""))
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
