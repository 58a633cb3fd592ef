"""Accelerators: XPU is a valid name, absent devices fail clearly, GPU precisions (where a GPU is), float64."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.training import quiet_trainer, tiny_egnn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import matsciml.tasks  # noqa: F401  (registers accelerator="xpu")
from matsciml.cli.app import main
from matsciml.cli.training import run
from matsciml.data.datamodules import S2EFDataModule
from matsciml.tasks import S2EFTask
from matsciml.trainer.accelerators import AcceleratorUnavailable, XPUAccelerator, check_accelerator, unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
HAS_XPU = hasattr(torch, "xpu") and torch.xpu.is_available()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def test_cpu_and_auto_are_always_allowed():
    assert unavailable_reason("cpu") is None and unavailable_reason("auto") is None
    check_accelerator("cpu")


@pytest.mark.skipif(HAS_XPU, reason="an Intel XPU is present")
def test_absent_xpu_fails_with_the_reason(tmp_path, monkeypatch, capsys):
    with pytest.raises(AcceleratorUnavailable, match=r"accelerator='xpu' was requested but .*xpu"):
        check_accelerator("xpu")
    monkeypatch.chdir(ROOT)
    code = main(
        [
            "fit",
            "--config",
            "configs/devset/is2re-egnn.yaml",
            "--trainer.accelerator=xpu",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "matsciml: error: trainer.accelerator='xpu' was requested" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # failed before anything was written


@pytest.mark.skipif(HAS_XPU, reason="an Intel XPU is present")
def test_xpu_is_a_registered_trainer_accelerator():
    # Lightning knows the name (no "invalid accelerator name"), and reports it unavailable here
    with pytest.raises(MisconfigurationException, match="XPUAccelerator` can not run on your system"):
        quiet_trainer(accelerator="xpu")
    assert XPUAccelerator.auto_device_count() == 0
    with pytest.raises(AcceleratorUnavailable, match=r"XPU devices \[0\] requested but 0 are visible"):
        XPUAccelerator.parse_devices(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_absent_gpu_fails_with_the_reason():
    with pytest.raises(AcceleratorUnavailable, match="torch sees no CUDA device"):
        check_accelerator("gpu")


@needs_cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_trains_on_gpu_with_float32_forces(precision):
    datamodule = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    datamodule.setup("fit")
    task = S2EFTask(tiny_egnn(), statistics=datamodule.target_statistics)
    trainer = quiet_trainer(
        accelerator="gpu", max_epochs=1, limit_train_batches=3, limit_val_batches=2, precision=precision
    )
    trainer.fit(task, datamodule=datamodule)
    metrics = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    assert np.isfinite(metrics["val/force_mae"]) and metrics["val/force_mae"] > 0
    task = task.cuda().eval()
    batch = next(iter(datamodule.val_dataloader())).to("cuda")
    reference = task(batch)
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    with torch.autocast("cuda", dtype=dtype):
        mixed = task(batch)
    assert mixed["forces"].dtype == torch.float32 and mixed["energy"].dtype == torch.float32
    torch.testing.assert_close(mixed["forces"], reference["forces"], rtol=1e-4, atol=1e-5)


class PositionDtypes(pl.Callback):
    """Records the dtype of the positions and of the weights each training forward pass of the model sees."""

    def __init__(self):
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def on_fit_start(self, trainer, pl_module):
        weight = next(pl_module.model.parameters())

        def record(module, args):
            if module.training:
                self.seen.append((args[0].positions.dtype, weight.dtype))

        pl_module.model.register_forward_pre_hook(record)


def test_cli_fits_in_float64_with_precision_64_true(tmp_path, monkeypatch):
    # Lightning's DoublePrecision converts the batch through apply_to_collection: a Batch is a Mapping
    monkeypatch.chdir(ROOT)
    probe = PositionDtypes()
    run(
        [
            "fit",
            "--config",
            "configs/devset/s2ef-egnn.yaml",
            "--trainer.precision=64-true",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--model.init_args.model.init_args.hidden=8",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        extra_callbacks=[probe],
    )
    assert probe.seen == [(torch.float64, torch.float64)] * 2
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
