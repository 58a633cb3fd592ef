"""A stand-in for ``init_from`` (built by another part of issue 14) that keeps its contract.

:class:`ParentedS2EFTask` holds ``init_from`` from its construction and loads the parent's weights
whose names and shapes match when its optimiser is first configured (as ``AtomisticTask`` does with
``init_from``), leaving ``init_report`` on the task, so step records, ``runs show`` and model cards
can be tested in real fits. Once the tasks take ``init_from``, this class adds nothing they lack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matsciml.artifacts.checkpoints import checkpoint_path
from matsciml.artifacts.model_loading import load_model, read_checkpoint
from matsciml.records.lineage import is_package
from matsciml.tasks import S2EFTask


class ParentedS2EFTask(S2EFTask):
    """An S2EF task started from ``parent`` (a checkpoint, run folder or package path)."""

    def __init__(self, *args: Any, parent: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.init_from, self.init_report = parent, None

    def configure_optimizers(self):
        if self.init_from is not None and self.init_report is None:
            path = Path(self.init_from)
            if is_package(path):
                state = load_model(path).state_dict()
            else:  # the weights only: a checkpoint of this class is not rebuilt
                state = read_checkpoint(checkpoint_path(path))["state_dict"]
            own = self.state_dict()
            loaded = [n for n, v in state.items() if n in own and own[n].shape == v.shape]
            self.load_state_dict({n: state[n] for n in loaded}, strict=False)
            self.init_report = {
                "parent": str(self.init_from),
                "loaded": loaded,
                "extended": [],
                "new": sorted(set(own) - set(loaded)),
                "dropped": sorted(set(state) - set(own)),
            }
        return super().configure_optimizers()
