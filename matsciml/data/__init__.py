"""Everything about structures, nothing about learning: records, batches, formats, DataModules.

Public names are imported lazily so that ``import matsciml.data`` stays cheap (the
DataModules pull in Lightning).
"""

from importlib import import_module

_PUBLIC = {
    "Batch": "matsciml.data.batch",
    "collate": "matsciml.data.batch",
    "DataError": "matsciml.data.errors",
    "LMDBDataset": "matsciml.data.datasets",
    "S2EFDataset": "matsciml.data.datasets",
    "IS2REDataset": "matsciml.data.datasets",
    "AtomisticDataModule": "matsciml.data.datamodules",
    "S2EFDataModule": "matsciml.data.datamodules",
    "IS2REDataModule": "matsciml.data.datamodules",
    "S2EFDGLDataModule": "matsciml.data.datamodules",
    "IS2REDGLDataModule": "matsciml.data.datamodules",
    "RadiusGraph": "matsciml.data.neighbors",
    "radius_graph": "matsciml.data.neighbors",
    "PointCloudSample": "matsciml.data.pointcloud",
    "PointCloudCollate": "matsciml.data.pointcloud",
    "DatasetWriter": "matsciml.data.formats.store",
    "devset_path": "matsciml.data.devsets",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'matsciml.data' has no attribute {name!r}")
