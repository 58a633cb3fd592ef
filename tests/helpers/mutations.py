"""Byte-level mutations of valid files, as plain data, for the seeded fuzzers (tests/fuzz, experiments/fuzz.py).

A mutation is a tuple ``(op, a, b, payload)``; :func:`apply` folds a list of them over a seed input.
Keeping mutations as data lets hypothesis draw and shrink them (:func:`mutations`) and lets the long
runner draw the same tuples from a seeded :class:`random.Random` (:func:`random_mutations`), so a
finding is a short, printable list that reproduces it exactly.

Besides bit flips, insertions, deletions and truncations, two ops aim at the fields decoders trust:
``int`` overwrites a fixed-width binary integer with a boundary value (lengths, counts, offsets in
headers), ``number`` replaces the ``a``-th ASCII number in the input with a hostile one (shapes in a
JSON header, atom counts in extxyz, sizes in model.json).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from hypothesis import strategies as st

Mutation = tuple[str, int, int, bytes]

OPS = ("flip", "byte", "insert", "delete", "truncate", "int", "number", "splice")
#: boundary values for binary integer fields (read as any width, either sign)
BOUNDARY_INTS = (0, 1, 2, 7, 8, 255, 256, 65535, 1 << 31, (1 << 31) - 1, (1 << 32) - 1, (1 << 62), (1 << 64) - 1)
#: replacements for ASCII numbers: negative, zero, huge, non-finite, non-integer
HOSTILE_NUMBERS = (b"-1", b"0", b"1", b"-0", b"99999999999", b"1e308", b"1e999", b"NaN", b"inf", b"2.5", b"-9" * 20)
_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_MAX_SIZE = 1 << 22  # mutated inputs stay below 4 MiB (insertions could otherwise grow them without end)


def apply(data: bytes, ops: Sequence[Mutation]) -> bytes:
    """``data`` with each mutation of ``ops`` applied in turn (positions are taken modulo the length)."""
    buffer = bytearray(data)
    for op, a, b, payload in ops:
        _apply_one(buffer, op, a, b, payload)
        del buffer[_MAX_SIZE:]
    return bytes(buffer)


def _apply_one(buffer: bytearray, op: str, a: int, b: int, payload: bytes) -> None:
    size = len(buffer)
    at = a % (size + 1)  # insert / truncate may act at the end
    if op == "insert":
        buffer[at:at] = payload or b"\0"
    elif op == "truncate":
        del buffer[at:]
    elif not size:
        return
    elif op == "flip":
        buffer[a % size] ^= 1 << (b % 8)
    elif op == "byte":
        buffer[a % size] = b % 256
    elif op == "delete":
        del buffer[a % size : a % size + 1 + b % 64]
    elif op == "int":
        width = (1, 2, 4, 8)[b % 4]
        value = BOUNDARY_INTS[(b // 4) % len(BOUNDARY_INTS)] % (1 << (8 * width))
        start = min(a % size, max(size - width, 0))
        buffer[start : start + width] = value.to_bytes(width, "little" if b % 3 else "big")
    elif op == "number":
        found = list(_NUMBER.finditer(buffer))
        if found:
            match = found[a % len(found)]
            buffer[match.start() : match.end()] = HOSTILE_NUMBERS[b % len(HOSTILE_NUMBERS)]
    elif op == "splice":  # repeat a chunk elsewhere: duplicated records, opcodes, JSON items
        start = a % size
        chunk = bytes(buffer[start : start + 1 + b % 256])
        at = (a + b) % (size + 1)
        buffer[at:at] = chunk
    else:
        raise ValueError(f"unknown mutation {op!r}; expected one of {OPS}")


def mutations(max_ops: int = 6) -> st.SearchStrategy[list[Mutation]]:
    """Hypothesis strategy for 1..``max_ops`` mutations."""
    one = st.tuples(
        st.sampled_from(OPS),
        st.integers(0, (1 << 31) - 1),
        st.integers(0, (1 << 31) - 1),
        st.binary(max_size=16),
    )
    return st.lists(one, min_size=1, max_size=max_ops)


def random_mutations(rng: random.Random, max_ops: int = 6) -> list[Mutation]:
    """The same kind of mutation list as :func:`mutations`, from a seeded generator."""
    return [
        (
            rng.choice(OPS),
            rng.getrandbits(31),
            rng.getrandbits(31),
            rng.randbytes(rng.choice((0, 1, 2, 4, 8, 16))),
        )
        for _ in range(rng.randint(1, max_ops))
    ]


def fuzz_inputs(seeds: Sequence[bytes], max_raw: int = 512) -> st.SearchStrategy[bytes]:
    """Hypothesis strategy: a mutated seed (mostly) or arbitrary bytes."""
    mutated = st.tuples(st.sampled_from(list(seeds)), mutations()).map(lambda pair: apply(*pair))
    return st.one_of(mutated, st.binary(max_size=max_raw))
