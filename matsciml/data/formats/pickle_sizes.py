"""Checking a pickle's declared sizes before CPython's unpickler allocates them.

Used by :mod:`matsciml.data.formats.safe_pickle` on every OC20 record: the restricted unpickler
decides *what* may be built, this decides *how much* a few bytes may ask for.
"""

from __future__ import annotations

import pickle
import pickletools

__all__ = ["check_sizes"]


def _opcode_sizes() -> list[int | None]:
    """Argument size of each opcode byte: bytes (>= 0), or one of pickletools' negative length kinds."""
    sizes: list[int | None] = [None] * 256
    for op in pickletools.opcodes:
        sizes[ord(op.code)] = op.arg.n if op.arg is not None else 0
    return sizes


_SIZES = _opcode_sizes()
_PUT, _LONG_BINPUT, _STOP, _GLOBAL, _INST = (ord(op) for op in "pr.ci")
_LENGTH_BYTES = {  # length-prefixed arguments: width of the length, and whether it is signed
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


def check_sizes(data: bytes, start: int = 0) -> int:
    """Refuse memo indices and lengths past the pickle's size; returns where the pickle at ``start`` ends.

    CPython's unpickler allocates what the pickle declares before it reads: its memo array grows to
    twice a ``PUT`` / ``LONG_BINPUT`` index (a 4-byte index in a 3 KB record: up to 64 GiB, zeroed),
    and ``BYTEARRAY8`` allocates its declared length. A writer numbers memo entries 0, 1, ... (each
    costs an opcode) and writes every byte it declares, so in a valid pickle neither passes the
    size. Only the opcodes are walked; the walk stops at ``STOP`` or at anything malformed, which
    the unpickler then reports itself.

    Raises:
        pickle.UnpicklingError: a memo index or an argument length past the end of ``data``.
    """
    pos, end = start, len(data)
    while pos < end:
        code = data[pos]
        pos += 1
        size = _SIZES[code]
        if size is None or code == _STOP:
            return pos
        if size >= 0:
            if code == _LONG_BINPUT and (index := int.from_bytes(data[pos : pos + 4], "little")) > end:
                raise pickle.UnpicklingError(f"pickle memo index {index} is past the end of its {end} bytes")
            pos += size
        elif size == pickletools.UP_TO_NEWLINE:
            for _ in range(2 if code in (_GLOBAL, _INST) else 1):  # GLOBAL / INST: module and name lines
                newline = data.find(b"\n", pos)
                if newline < 0:
                    return end
                text = data[pos:newline].strip()
                if code == _PUT and text.isdigit() and int(text) > end:
                    raise pickle.UnpicklingError(f"pickle memo index {int(text)} is past the end of its {end} bytes")
                pos = newline + 1
        else:
            width, signed = _LENGTH_BYTES[size]
            length = int.from_bytes(data[pos : pos + width], "little", signed=signed)
            if length < 0:  # the unpickler refuses a negative length itself
                return end
            pos += width + length
            if pos > end:
                raise pickle.UnpicklingError(f"pickle declares {length} bytes where {end - pos + length} remain")
    return pos
