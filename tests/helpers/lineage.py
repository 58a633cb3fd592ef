"""A stand-in for ``init_from`` (built by another part of issue 14) that keeps its contract.

:class:`ParentedS2EFTask` loads the weights of a parent checkpoint or package whose names and shapes
match, and leaves ``init_from`` and ``init_report`` on the task as ``AtomisticTask`` does with
``init_from``, so step records, ``runs show`` and model cards can be tested in real fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matsciml.artifacts.model_loading import load_model, read_checkpoint
from matsciml.records.lineage import is_package
from matsciml.tasks import S2EFTask


class ParentedS2EFTask(S2EFTask):
    """An S2EF task started from ``parent`` (a checkpoint or package path)."""

    def __init__(self, *args: Any, parent: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.init_from, self.init_report = parent, None
        if parent is None:
            return
        if is_package(Path(parent)):
            state = load_model(parent, trusted_modules=["helpers"]).state_dict()
        else:
            state = read_checkpoint(parent)["state_dict"]
        own = self.state_dict()
        loaded = [n for n, v in state.items() if n in own and own[n].shape == v.shape]
        self.load_state_dict({n: state[n] for n in loaded}, strict=False)
        self.init_report = {
            "parent": parent,
            "loaded": loaded,
            "extended": [],
            "new": sorted(set(own) - set(loaded)),
            "dropped": sorted(set(state) - set(own)),
        }
