"""Every shipped data config names a real class and arguments it accepts."""

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _instantiate(block: dict, **overrides):
    module, _, name = block["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**block["init_args"], **overrides})


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_data_config_instantiates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # devset paths are relative to the repository root
    block = yaml.safe_load(path.read_text())["data"]
    if "<OC20_ROOT>" in str(block["init_args"]):  # a template: check names and types only
        dm = _instantiate(block)
        assert dm.paths["train"].startswith("<OC20_ROOT>")
        return
    dm = _instantiate(block)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())).num_structures == block["init_args"]["batch_size"]
