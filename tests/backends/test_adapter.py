"""The adapter in the main environment (no DGL, no PyG needed)."""

from __future__ import annotations

import sys

import pytest
from helpers.structures import slab_record

from matsciml.data import S2EFDGLDataModule
from matsciml.data.backends import as_batch, backend_of, collate_function
from matsciml.data.batch import collate
from matsciml.data.datamodules import IS2REDataModule, S2EFDataModule


def test_a_native_batch_passes_through_as_is():
    batch = collate([slab_record(0)])
    assert as_batch(batch) is batch
    assert backend_of(batch) == "native"


def test_other_objects_are_refused_by_name():
    with pytest.raises(TypeError, match="builtins.dict"):
        as_batch({"positions": None})


def test_the_core_does_not_import_dgl_or_pyg():
    batch = collate([slab_record(0)])
    before = {"dgl", "torch_geometric"} & set(sys.modules)
    as_batch(batch)
    S2EFDataModule.from_devset().collate_fn()
    assert {"dgl", "torch_geometric"} & set(sys.modules) == before


def test_graph_backend_is_checked():
    with pytest.raises(ValueError, match="graph_backend must be"):
        S2EFDataModule.from_devset(graph_backend="jax")
    with pytest.raises(ValueError, match="point clouds are only batched natively"):
        IS2REDataModule.from_devset(representation="point_cloud", graph_backend="dgl")
    with pytest.raises(ValueError, match="graph_backend must be"):
        collate_function("jax")


def test_native_is_the_default_and_dgl_for_the_paper_names():
    assert S2EFDataModule.from_devset().collate_fn() is collate
    data = S2EFDGLDataModule.from_devset(batch_size=2)
    assert data.graph_backend == "dgl" and data.hparams["graph_backend"] == "dgl"
    assert data.batch_size == 2


def test_missing_library_is_a_clear_import_error():
    pytest.importorskip("numpy")
    try:
        import dgl  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="make test-dgl"):
            S2EFDGLDataModule.from_devset().collate_fn()([slab_record(0)])
    else:
        pytest.skip("DGL is installed here")
