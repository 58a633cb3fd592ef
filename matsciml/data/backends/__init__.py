"""Adapters between our :class:`~matsciml.data.batch.Batch` and DGL / PyG batches.

Nothing here imports DGL or PyG until an object from them (or a conversion to them) asks
for it, so the core stays free of both (``docs/architecture.md``). The one entry point the
models and tasks use is :func:`as_batch`; field names on each side are listed in
``docs/backends.md`` and in :mod:`matsciml.data.backends.dgl` / :mod:`~.pyg`.

* ``to_dgl(batch)`` / ``from_dgl(graph)``: a batched ``dgl.DGLGraph``;
* ``to_pyg(batch)`` / ``from_pyg(data)``: a ``torch_geometric.data.Batch``;
* ``collate_dgl`` / ``collate_pyg``: our collate, then the conversion (DataLoader ``collate_fn``).

Conversions share tensors instead of copying them, so autograd sees one set of positions:
forces computed from a converted batch are ``-dE/dpos`` of that batch's own positions.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Literal

from matsciml.data.batch import Batch

GraphBackend = Literal["native", "dgl", "pyg"]
GRAPH_BACKENDS: tuple[str, ...] = ("native", "dgl", "pyg")

_PUBLIC = {
    "to_dgl": "matsciml.data.backends.dgl",
    "from_dgl": "matsciml.data.backends.dgl",
    "collate_dgl": "matsciml.data.backends.dgl",
    "graph_fields": "matsciml.data.backends.dgl",
    "to_pyg": "matsciml.data.backends.pyg",
    "from_pyg": "matsciml.data.backends.pyg",
    "collate_pyg": "matsciml.data.backends.pyg",
}

__all__ = ["GRAPH_BACKENDS", "GraphBackend", "as_batch", "backend_of", *sorted(_PUBLIC)]


def backend_of(obj: Any) -> str:
    """``"native"``, ``"dgl"`` or ``"pyg"`` for a batch object, judged by its class's module."""
    if isinstance(obj, Batch):
        return "native"
    # PyG's batches are classes made at run time (``abc.DataBatch``): look through the bases
    packages = {cls.__module__.partition(".")[0] for cls in type(obj).__mro__}
    if "dgl" in packages:
        return "dgl"
    if "torch_geometric" in packages:
        return "pyg"
    raise TypeError(
        f"expected a matsciml Batch, a dgl.DGLGraph or a torch_geometric Batch/Data, "
        f"got {type(obj).__module__}.{type(obj).__qualname__}"
    )


def as_batch(obj: Any) -> Batch:
    """Our :class:`Batch` for a ``Batch`` (returned as is), a DGL graph or a PyG batch.

    DGL and PyG are imported only when ``obj`` comes from them. Tensors are shared, not
    copied (see :func:`~matsciml.data.backends.dgl.from_dgl`, :func:`~.pyg.from_pyg`).

    Raises:
        TypeError: any other object.
    """
    if isinstance(obj, Batch):  # the hot path: one isinstance per forward
        return obj
    backend = backend_of(obj)
    if backend == "dgl":
        from matsciml.data.backends.dgl import from_dgl

        return from_dgl(obj)
    from matsciml.data.backends.pyg import from_pyg

    return from_pyg(obj)


def collate_function(backend: str):
    """The DataLoader ``collate_fn`` of a graph backend (module-level functions: picklable)."""
    if backend == "native":
        from matsciml.data.batch import collate

        return collate
    if backend == "dgl":
        from matsciml.data.backends.dgl import collate_dgl

        return collate_dgl
    if backend == "pyg":
        from matsciml.data.backends.pyg import collate_pyg

        return collate_pyg
    raise ValueError(f"graph_backend must be one of {GRAPH_BACKENDS}, got {backend!r}")


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'matsciml.data.backends' has no attribute {name!r}")
