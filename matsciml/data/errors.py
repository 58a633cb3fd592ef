"""The one error type for bad data: it always names the file and the record."""

from __future__ import annotations

from os import PathLike


class DataError(ValueError):
    """A dataset file or one of its records cannot be used.

    Args:
        source: the file or directory the problem is in.
        message: what is wrong, in words a user can act on.
        record: the record's key or index in that file, when the problem is one record.
    """

    def __init__(self, source: str | PathLike, message: str, record: int | str | None = None):
        self.source = str(source)
        self.record = record
        self.reason = message
        where = self.source if record is None else f"{self.source}, record {record}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # keep the fields when the error crosses a worker process boundary
        return (type(self), (self.source, self.reason, self.record))
