"""Our :class:`~matsciml.data.batch.Batch` as a batched ``dgl.DGLGraph``, and back.

The graph is built batched (``batch_num_nodes`` = ``natoms``, ``batch_num_edges`` = edges
per structure), so ``dgl.unbatch`` gives one graph per structure and ``dgl.batch`` of such
graphs converts back. Edges run from the neighbour ``j`` (source) to the centre ``i``
(destination), so ``update_all`` aggregates at the centre, as our ``edge_index`` does.

Field names on the graph:

=====================  ========================================================================
``g.ndata``            ``pos`` (our ``positions``), ``atomic_numbers``, ``tags``, ``fixed``,
                       ``forces``, ``relaxed_positions``: the atom fields that the batch holds
``g.edata``            ``cell_shifts`` (integer lattice shifts S: vector i->j is
                       ``pos[j] - pos[i] + S @ cell``)
``g.ndata["graph_*"]`` per-structure fields broadcast to that structure's atoms: ``graph_cell``,
                       ``graph_pbc``, ``graph_sid``, ``graph_fid``, ``graph_energy``,
                       ``graph_stress``, ``graph_relaxed_energy``, ``graph_initial_energy``;
                       :func:`graph_fields` returns them per structure, shape ``(B, ...)``
``natoms``             ``g.batch_num_nodes()``
=====================  ========================================================================

DGL has no per-graph storage; broadcasting to the atoms keeps those fields through
``dgl.batch``/``dgl.unbatch``, ``g.to(device)`` and pickling (DataLoader workers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from matsciml.data import keys as K
from matsciml.data.batch import Batch, collate

if TYPE_CHECKING:
    import dgl

#: our atom-field name -> DGL node-data name (every other atom field keeps its name)
NODE_NAMES = {K.POSITIONS: "pos"}
#: prefix of per-structure fields broadcast to node data
GRAPH_PREFIX = "graph_"
_DERIVED = (K.STRUCTURE_INDEX, K.PTR, K.NATOMS)


def _import_dgl():
    try:
        import dgl
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "graph_backend='dgl' needs DGL (pip install 'matsciml[dgl]'; DGL 2.1 needs "
            "torch <= 2.2.1, see `make test-dgl` and docs/backends.md)"
        ) from err
    return dgl


def check_graph_batch(batch: Batch, backend: str) -> None:
    if batch.point_index is not None:
        raise ValueError(f"point-cloud batches stay native; {backend} batches are graphs (use representation='graph')")
    if batch.edge_index is None:
        raise ValueError(f"the batch has no edge_index; {backend} batches need the radius graph")


def edges_per_structure(batch: Batch) -> torch.Tensor:
    """Edge counts per structure ``(B,)``; edges must be grouped by structure, as collate leaves them."""
    edge_structure = batch.structure_index[batch.edge_index[1]]
    if edge_structure.numel() > 1 and bool((edge_structure[1:] < edge_structure[:-1]).any()):
        raise ValueError("edges are not grouped by structure; cannot form per-structure graphs")
    return torch.bincount(edge_structure, minlength=batch.num_structures)


def to_dgl(batch: Batch) -> dgl.DGLGraph:
    """A batched DGL graph holding every field of ``batch`` (tensors shared, not copied).

    Raises:
        ValueError: a point-cloud batch or one without a radius graph.
        ImportError: DGL is not installed.
    """
    dgl = _import_dgl()
    check_graph_batch(batch, "DGL")
    source, destination = batch.edge_index
    graph = dgl.graph(
        (source, destination), num_nodes=batch.num_atoms, idtype=batch.edge_index.dtype, device=batch.device
    )
    graph.set_batch_num_nodes(batch.natoms)
    graph.set_batch_num_edges(edges_per_structure(batch))
    for name, value in batch.items():
        field = K.FIELDS[name]
        if name in _DERIVED or name == K.EDGE_INDEX:
            continue
        if field.level == "atom":
            graph.ndata[NODE_NAMES.get(name, name)] = value
        elif field.level == "edge":
            graph.edata[name] = value
        elif field.level == "structure":
            graph.ndata[GRAPH_PREFIX + name] = value[batch.structure_index]
    return graph


def from_dgl(graph: dgl.DGLGraph) -> Batch:
    """Our batch from a (batched) DGL graph made by :func:`to_dgl` or ``dgl.batch`` of such graphs.

    Atom and edge tensors are the graph's own (autograd reaches ``graph.ndata["pos"]``);
    per-structure fields are read at each structure's first atom. Node or edge data under
    names that are not batch fields are ignored.
    """
    names = {dgl_name: name for name, dgl_name in NODE_NAMES.items()}
    natoms = graph.batch_num_nodes()
    num_structures = int(natoms.shape[0])
    ptr = torch.zeros(num_structures + 1, dtype=natoms.dtype, device=natoms.device)
    torch.cumsum(natoms, 0, out=ptr[1:])
    structure_index = torch.repeat_interleave(torch.arange(num_structures, device=natoms.device), natoms)
    source, destination = graph.edges(order="eid")
    fields: dict[str, torch.Tensor] = {
        K.EDGE_INDEX: torch.stack([source, destination]),
        K.NATOMS: natoms,
        K.STRUCTURE_INDEX: structure_index,
        K.PTR: ptr,
    }
    first_atoms = ptr[:-1]
    for key, value in graph.ndata.items():
        if key.startswith(GRAPH_PREFIX):
            name = key[len(GRAPH_PREFIX) :]
            if K.FIELDS.get(name) is not None and K.FIELDS[name].level == "structure":
                fields[name] = value[first_atoms]
            continue
        name = names.get(key, key)
        if name in K.FIELDS and K.FIELDS[name].level == "atom":
            fields[name] = value
    for key, value in graph.edata.items():
        if key in K.FIELDS and K.FIELDS[key].level == "edge" and key != K.EDGE_INDEX:
            fields[key] = value
    if K.POSITIONS not in fields:
        raise ValueError("the DGL graph has no node data 'pos' (positions)")
    return Batch(**fields)


def graph_fields(graph: dgl.DGLGraph) -> dict[str, torch.Tensor]:
    """Per-structure fields of a graph from :func:`to_dgl`, shape ``(B, ...)``, plus ``natoms``."""
    natoms = graph.batch_num_nodes()
    first_atoms = torch.cumsum(natoms, 0) - natoms
    out = {K.NATOMS: natoms}
    for key, value in graph.ndata.items():
        if key.startswith(GRAPH_PREFIX):
            out[key[len(GRAPH_PREFIX) :]] = value[first_atoms]
    return out


def collate_dgl(records: Sequence[Mapping[str, np.ndarray]]) -> dgl.DGLGraph:
    """``collate`` then :func:`to_dgl`: a DataLoader ``collate_fn`` (picklable, module level)."""
    return to_dgl(collate(records))
