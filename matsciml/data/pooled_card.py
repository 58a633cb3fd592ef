"""One card for several datasets: what the data knows, pooled over every record once.

Species are the union of the datasets' elements; target statistics and the composition sums of
:mod:`matsciml.data.composition` are pooled as if the datasets were one (counts add, means are
count-weighted, variances combine through the second moments, sums add). The sampling ``weights``
of a mixture do not enter: they set how often each dataset is *seen*, while the normaliser and
element references describe what the model must cover - the units of its output. Pooled this way,
they stay fixed when only the replay fraction changes, and every record counts once, as in one dataset.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from matsciml.data.formats.card import COMPOSITION

__all__ = ["pool_cards"]

_HISTOGRAMS = ("elements", "natoms_histogram")
_TOTALS = ("num_atoms", "num_fixed_atoms")


def pool_cards(cards: Sequence[Mapping]) -> dict:
    """The card of the union of the datasets (elements, histograms, atom counts, statistics).

    Statistics that only some datasets have are left out: a normaliser taken from part of the
    data would misdescribe the rest.
    """
    pooled: dict = {"task": cards[0].get("task")}
    for key in _HISTOGRAMS:
        total: Counter[str] = Counter()
        for card in cards:
            total.update({str(k): int(v) for k, v in card.get(key, {}).items()})
        pooled[key] = {k: total[k] for k in sorted(total, key=int)}
    for key in _TOTALS:
        pooled[key] = sum(int(card.get(key, 0)) for card in cards)
    statistics = [card["statistics"] for card in cards]
    common = [k for k in statistics[0] if all(k in s for s in statistics)]
    pooled["statistics"] = {k: _pool_entry(k, [s[k] for s in statistics]) for k in common}
    return pooled


def _pool_entry(key: str, entries: list[Mapping]) -> dict:
    if key == COMPOSITION:
        return {kind: pool_sums([e[kind] for e in entries]) for kind in entries[0]}
    if "components" in entries[0]:  # forces: component and norm moments
        return {
            "components": pool_moments([e["components"] for e in entries]),
            "norms": pool_moments([e["norms"] for e in entries]),
            "free_atoms_only": all(e.get("free_atoms_only", False) for e in entries),
        }
    return pool_moments(entries)


def pool_moments(parts: Sequence[Mapping]) -> dict:
    """Count, mean, std, min and max of the union of streams summarised by ``parts``."""
    counts = np.asarray([p["count"] for p in parts], dtype=np.float64)
    means = np.asarray([p["mean"] for p in parts], dtype=np.float64)
    squares = np.asarray([p["std"] ** 2 + p["mean"] ** 2 for p in parts], dtype=np.float64)
    count = float(counts.sum())
    mean = float(counts @ means / count)
    variance = max(float(counts @ squares / count) - mean * mean, 0.0)
    return {
        "count": int(count),
        "mean": mean,
        "std": variance**0.5,
        "min": min(p["min"] for p in parts),
        "max": max(p["max"] for p in parts),
    }


def pool_sums(parts: Sequence[Mapping]) -> dict:
    """The composition sums (:meth:`CompositionMoments.summary`) of the union, over the union of elements."""
    elements = sorted({int(z) for p in parts for z in p["elements"]})
    index = {z: i for i, z in enumerate(elements)}
    xx = np.zeros((len(elements), len(elements)))
    xt, x = np.zeros(len(elements)), np.zeros(len(elements))
    for part in parts:
        at = [index[int(z)] for z in part["elements"]]
        xx[np.ix_(at, at)] += np.asarray(part["xx"], dtype=np.float64).reshape(len(at), len(at))
        xt[at] += np.asarray(part["xt"], dtype=np.float64)
        x[at] += np.asarray(part["x"], dtype=np.float64)
    return {
        "count": sum(int(p["count"]) for p in parts),
        "elements": elements,
        "xx": xx.tolist(),
        "xt": xt.tolist(),
        "x": x.tolist(),
        "t": float(sum(p["t"] for p in parts)),
        "tt": float(sum(p["tt"] for p in parts)),
    }
