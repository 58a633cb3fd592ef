"""Our :class:`~matsciml.data.batch.Batch` as a ``torch_geometric.data.Batch``, and back.

Field names follow PyG and OC20: ``pos`` (our ``positions``), ``batch`` (our
``structure_index``) and ``ptr``; every other field keeps its name (``atomic_numbers``,
``tags``, ``fixed``, ``forces``, ``edge_index``, ``cell_shifts``, ``cell`` ``(B, 3, 3)``,
``natoms``, ``sid``, ``fid``, ``energy``, ``relaxed_energy``, ...). ``edge_index`` row 0 is the
neighbour (source) and row 1 the centre (target), PyG's default ``source_to_target`` flow.
The batch carries PyG's slice bookkeeping, so ``to_data_list()`` / ``get_example(b)`` work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from matsciml.data import keys as K
from matsciml.data.backends.dgl import check_graph_batch, edges_per_structure
from matsciml.data.batch import Batch, collate

if TYPE_CHECKING:
    import torch_geometric

#: our name -> PyG name (every other field keeps its name)
PYG_NAMES = {K.POSITIONS: "pos", K.STRUCTURE_INDEX: "batch", K.PTR: "ptr"}


def _import_pyg():
    try:
        import torch_geometric.data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("graph_backend='pyg' needs PyTorch Geometric (pip install 'matsciml[pyg]')") from err
    return torch_geometric


def to_pyg(batch: Batch) -> torch_geometric.data.Batch:
    """A PyG batch holding every field of ``batch`` (tensors shared, not copied).

    Raises:
        ValueError: a point-cloud batch or one without a radius graph.
        ImportError: PyG is not installed.
    """
    pyg = _import_pyg()
    check_graph_batch(batch, "PyG")
    edge_ptr = torch.zeros(batch.num_structures + 1, dtype=torch.long, device=batch.device)
    torch.cumsum(edges_per_structure(batch), 0, out=edge_ptr[1:])
    structure_ptr = torch.arange(batch.num_structures + 1, device=batch.device)
    ptr = batch.ptr
    out = pyg.data.Batch(**{PYG_NAMES.get(name, name): value for name, value in batch.items()})
    slices: dict[str, torch.Tensor] = {}
    increments: dict[str, torch.Tensor] = {}
    for name, _ in batch.items():
        field = K.FIELDS[name]
        if field.level == "derived":
            continue
        key = PYG_NAMES.get(name, name)
        slices[key] = {"atom": ptr, "edge": edge_ptr, "structure": structure_ptr}[field.level]
        increments[key] = ptr[:-1] if field.is_index else torch.zeros_like(ptr[:-1])
    out._num_graphs = batch.num_structures
    out._slice_dict = slices
    out._inc_dict = increments
    return out


def from_pyg(data: Any) -> Batch:
    """Our batch from a PyG ``Batch`` (or a single ``Data``): the tensors are the PyG object's own.

    Attributes that are not batch fields are ignored; ``structure_index``/``ptr`` come from
    ``batch``/``ptr`` (or a single structure when absent), ``natoms`` from ``ptr`` when absent.
    """
    names = {pyg_name: name for name, pyg_name in PYG_NAMES.items()}
    fields: dict[str, torch.Tensor] = {}
    for key in data.keys():
        name = names.get(key, key)
        value = data[key]
        if name in K.FIELDS and isinstance(value, torch.Tensor):
            fields[name] = value
    positions = fields.get(K.POSITIONS)
    if positions is None:
        raise ValueError("the PyG object has no 'pos' (positions)")
    if K.STRUCTURE_INDEX not in fields:  # a single Data
        fields[K.STRUCTURE_INDEX] = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
    if K.PTR not in fields:
        counts = torch.bincount(fields[K.STRUCTURE_INDEX])
        fields[K.PTR] = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    if K.NATOMS not in fields:
        fields[K.NATOMS] = fields[K.PTR].diff()
    elif fields[K.NATOMS].dim() == 0:
        fields[K.NATOMS] = fields[K.NATOMS].reshape(1)
    return Batch(**fields)


def collate_pyg(records: Sequence[Mapping[str, np.ndarray]]) -> torch_geometric.data.Batch:
    """``collate`` then :func:`to_pyg`: a DataLoader ``collate_fn`` (picklable, module level)."""
    return to_pyg(collate(records))
