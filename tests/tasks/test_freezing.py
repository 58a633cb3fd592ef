"""Freezing parameters by name pattern (``freeze``, ``unfreeze_after_epochs``): real Lightning runs, S2EF devset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.training import QUICK_FIT, quiet_trainer, tiny_egnn
from lightning.pytorch.callbacks import ModelCheckpoint

from matsciml.cli.app import main
from matsciml.data.datamodules import S2EFDataModule
from matsciml.tasks import S2EFTask
from matsciml.tasks.divergence import DivergenceGuard

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed" / "freeze_ddp_script.py"
FROZEN = ["model.embedding.*", "model.layers.0.*"]


class StepRecorder(pl.Callback):
    """The raw parameters after every optimiser step, and which of them had a gradient before it."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []
        self.with_grad: list[set[str]] = []
        self.requiring_grad: list[set[str]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.with_grad.append({n for n, p in pl_module.named_parameters() if p.grad is not None})
        self.requiring_grad.append({n for n, p in pl_module.named_parameters() if p.requires_grad})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def new_task(**kwargs) -> S2EFTask:
    torch.manual_seed(0)
    return S2EFTask(tiny_egnn(), **{"lr": 3e-3, **kwargs})


def fit(task: S2EFTask, folder: Path | None = None, ckpt_path=None, **trainer_kwargs) -> StepRecorder:
    recorder = StepRecorder()
    callbacks = [recorder, DivergenceGuard()]
    if folder is not None:
        callbacks.append(ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1, save_top_k=0))
    settings = dict(limit_train_batches=2, limit_val_batches=1, max_epochs=2, callbacks=callbacks)
    trainer = quiet_trainer(**{**settings, **trainer_kwargs}, enable_checkpointing=folder is not None)
    trainer.fit(task, datamodule=S2EFDataModule.from_devset(batch_size=4), ckpt_path=ckpt_path)
    return recorder


def split(names, patterns=FROZEN) -> tuple[list[str], list[str]]:
    frozen = [n for n in names if any(n.startswith(p.rstrip("*")) for p in patterns)]
    return frozen, [n for n in names if n not in frozen]


def test_frozen_parameters_stay_bitwise_get_no_gradient_and_the_ema_keeps_them():
    task = new_task(freeze=FROZEN, ema_decay=0.5)
    initial = {n: p.detach().clone() for n, p in task.named_parameters()}
    frozen, trained = split(initial)
    assert len(frozen) == 7 and trained
    recorder = fit(task)
    assert len(recorder.weights) == 4
    for weights, with_grad, requiring in zip(
        recorder.weights, recorder.with_grad, recorder.requiring_grad, strict=True
    ):
        assert all(torch.equal(weights[n], initial[n]) for n in frozen)
        assert not with_grad & set(frozen) and not requiring & set(frozen)  # no gradient is even computed
        assert with_grad == set(trained)
    assert all(not torch.equal(recorder.weights[-1][n], initial[n]) for n in trained)
    # the task ends holding the EMA of the weights: frozen values are still bitwise the initial ones
    assert all(torch.equal(p, initial[n]) for n, p in task.named_parameters() if n in frozen)
    assert all(p.requires_grad for p in task.parameters())  # restored when fitting ends
    state = task.trainer.optimizers[0].state
    assert [n for n, p in task.named_parameters() if p in state] == trained  # Adam never touched them


def test_released_parameters_train_from_epoch_k_on(tmp_path):
    task = new_task(freeze=["model.embedding.*"], unfreeze_after_epochs=1)
    initial = task.model.embedding.weight.detach().clone()
    recorder = fit(task, max_epochs=3)
    assert len(recorder.weights) == 6  # 2 steps per epoch; epoch 0 frozen, epochs 1 and 2 trained
    embedding = [w["model.embedding.weight"] for w in recorder.weights]
    assert torch.equal(embedding[0], initial) and torch.equal(embedding[1], initial)
    assert ["model.embedding.weight" in g for g in recorder.with_grad] == [False, False, True, True, True, True]
    previous = initial
    for weights in embedding[2:]:  # changes at every step once released
        assert not torch.equal(weights, previous)
        previous = weights


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_a_run_resumed_mid_epoch_before_the_release_ends_bitwise_like_an_uninterrupted_one(tmp_path):
    settings = dict(freeze=["model.embedding.*"], unfreeze_after_epochs=1)
    whole = new_task(**settings)
    fit(whole, tmp_path / "whole")
    first = new_task(**settings)
    fit(first, tmp_path / "resumed", max_steps=1)  # stops after the first of epoch 0's two steps
    resumed = new_task(**settings)
    recorder = fit(resumed, tmp_path / "resumed", ckpt_path=tmp_path / "resumed" / "last.ckpt")
    assert ["model.embedding.weight" in g for g in recorder.with_grad] == [False, True, True]  # step 1, epoch 1
    expected = dict(whole.named_parameters())
    for name, parameter in resumed.named_parameters():
        assert torch.equal(parameter, expected[name]), name
    assert not torch.equal(resumed.model.embedding.weight, first.model.embedding.weight)


def test_bad_freeze_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"'model\.embeding\.\*' matches no parameter.*mean 'model\.embedding\.\*'"):
        new_task(freeze=["model.embeding.*"])
    with pytest.raises(ValueError, match=r"'layers\.0\.\*' matches no.*mean 'model\.layers\.0\.\*'.*model\.output\.\*"):
        new_task(freeze=["layers.0.*"])  # the closest module, and the modules there are
    with pytest.raises(TypeError, match="list of name patterns"):
        new_task(freeze="model.embedding.*")
    with pytest.raises(ValueError, match="matches every parameter"):
        new_task(freeze=["*"])
    with pytest.raises(ValueError, match="freeze is not"):
        new_task(unfreeze_after_epochs=2)
    with pytest.raises(ValueError, match=">= 1"):
        new_task(freeze=["model.embedding.*"], unfreeze_after_epochs=0)
    assert new_task(freeze=["*"], unfreeze_after_epochs=1).freeze_patterns == ["*"]  # all frozen, then all train


def test_freeze_through_the_cli(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)  # devset paths are relative to the repository root
    argv = [
        "fit",
        *QUICK_FIT,
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--model.init_args.freeze=[model.embedding.*]",
    ]
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert "freezing 1 of" in caplog.text and "matching ['model.embedding.*'] for the whole run" in caplog.text
    (last,) = tmp_path.rglob("last.ckpt")
    saved = torch.load(last, weights_only=True)
    assert saved["hyper_parameters"]["freeze"] == ["model.embedding.*"]
    task = S2EFTask.load_from_checkpoint(last, weights_only=True)
    names = [n for n, _ in task.named_parameters()]
    (state,) = saved["optimizer_states"]
    # Adam's state is keyed by parameter index: every parameter but the frozen embedding was stepped
    assert sorted(state["state"]) == [i for i, n in enumerate(names) if n != "model.embedding.weight"]


def test_the_cli_refuses_a_pattern_matching_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = ["fit", "--config", "configs/devset/s2ef-egnn.yaml", f"--trainer.default_root_dir={tmp_path}"]
    assert main([*argv, "--model.init_args.freeze=[layers.0.*]"]) == 2
    assert "config refused: freeze pattern 'layers.0.*' matches no parameter" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def parent_checkpoint(tmp_path_factory):
    """A checkpoint of the tiny EGNN after a few steps on the devset: the parent of a DDP fine-tune."""
    path = tmp_path_factory.mktemp("parent") / "parent.ckpt"
    torch.manual_seed(1)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(S2EFTask(tiny_egnn(), lr=3e-3), datamodule=S2EFDataModule.from_devset(batch_size=4))
    trainer.save_checkpoint(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "release, tune", [(None, False), (1, False), (None, True)], ids=["frozen", "released", "fine-tune"]
)
def test_ddp_with_frozen_parameters_keeps_ranks_identical(tmp_path, release, tune, request):
    # 2 gloo processes on different batches: frozen parameters must not break DDP (no unused-parameter
    # error) and stay bitwise; released ones must be averaged over the ranks, else their copies drift apart
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK", "WORLD_SIZE", "PL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    command = [sys.executable, str(SCRIPT), str(tmp_path), *(["--release", str(release)] if release else [])]
    parent = request.getfixturevalue("parent_checkpoint") if tune else None
    command += [] if parent is None else ["--init-from", str(parent)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches"] != ranks[1]["batches"]  # the ranks saw different data
    for rank in ranks:
        assert rank["frozen_unchanged_while_frozen"]
        assert rank["released_changed"] is (release is not None)
        assert rank["others_changed"]
    differ = [name for name, value in ranks[0]["weights"].items() if ranks[1]["weights"][name] != value]
    assert not differ, f"the ranks' copies of {differ} drifted apart"  # every parameter bitwise equal on both ranks
    if parent is not None:  # every rank started from the parent: its frozen embedding is the parent's, bitwise
        embedding = torch.load(parent, weights_only=True)["state_dict"]["model.embedding.weight"]
        for rank in ranks:
            assert rank["start_embedding"] == embedding.contiguous().numpy().tobytes().hex()
            assert rank["init_report"]["new"] == [] and rank["init_report"]["extended"] == []
