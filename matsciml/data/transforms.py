"""Small composable record transforms: each is a callable ``record -> record``.

A transform raises ``ValueError`` for a record it cannot handle; the dataset reports it
as a :class:`~matsciml.data.errors.DataError` naming the file and record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Record = dict[str, np.ndarray]


class Compose:
    """Apply transforms in order.

    Args:
        transforms: callables taking and returning a record.
    """

    def __init__(self, transforms: Sequence[Callable[[Record], Record]]):
        self.transforms = list(transforms)

    def __call__(self, record: Record) -> Record:
        for transform in self.transforms:
            record = transform(record)
        return record

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"
