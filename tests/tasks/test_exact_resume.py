"""Exact resume: a run SIGKILLed mid-epoch and resumed from last.ckpt ends bitwise equal to an uninterrupted one.

The runs are real ``matsciml fit`` processes (1 process, and 2-process DDP on gloo) on the IS2RE devset with
a tiny EGNN, an EMA of the weights and a checkpoint every step; the kill is ``KillAtStep`` (SIGKILL, no
handler runs), at a seeded random step. Dead-run detection is checked on the killed run's record.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from matsciml.data.datamodules import IS2REDataModule
from matsciml.records import runs
from matsciml.records.provenance import COMPLETED, RESUMED, StepRecord, load_record, load_schema
from matsciml.trainer.resume import step_checkpoint

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (the test extra has it)")

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, BATCHES = 3, 4  # 12 optimiser steps
TINY_EGNN = {"hidden": 8, "num_layers": 1, "projection_hidden": 16, "output_hidden": 8}


def fit_command(save_dir: Path, *extra: str, devices: int = 1) -> list[str]:
    command = [
        str(Path(sys.executable).with_name("matsciml")),
        "fit",
        "--config",
        "configs/devset/is2re-egnn.yaml",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
        f"--trainer.max_epochs={EPOCHS}",
        f"--trainer.limit_train_batches={BATCHES}",
        "--trainer.limit_val_batches=2",
        "--trainer.deterministic=true",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--checkpoint_every_n_steps=1",
        "--model.init_args.ema_decay=0.9",
        *(f"--model.init_args.model.init_args.{k}={v}" for k, v in TINY_EGNN.items()),
        *extra,
    ]
    return command + (["--trainer.strategy=ddp"] if devices > 1 else [])


def flat_tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    return {k: v for key, item in items for k, v in flat_tensors(item, f"{prefix}/{key}").items()}


def training_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Weights (the EMA's, as saved), raw weights, optimiser and LR scheduler state of a checkpoint."""
    saved = torch.load(checkpoint, weights_only=True)
    ema = saved["callbacks"]["EMAWeightAveraging"]
    state = {"state_dict": saved["state_dict"], "raw": saved["current_model_state"], "ema": ema}
    state.update(optimizer=saved["optimizer_states"], lr_schedulers=saved["lr_schedulers"])
    return flat_tensors(state)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(
        (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        for x, y in zip(a.values(), b.values(), strict=True)
    )


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["one-process", "ddp-2"])
def test_a_killed_run_resumes_bitwise_equal_in_its_own_folder(tmp_path, devices):
    from distributed.test_ddp import base_env  # a fresh MASTER_PORT per run, no inherited launcher variables

    kill_step = random.Random(13 + devices).randint(2, EPOCHS * BATCHES - 2)
    kill = {"class_path": "helpers.interrupts.KillAtStep", "init_args": {"step": kill_step, "marker": ""}}
    kill["init_args"]["marker"] = str(tmp_path / "killed")
    pythonpath = f"{ROOT}:{ROOT / 'tests'}"

    reference = run(fit_command(tmp_path / "reference", devices=devices), base_env(PYTHONPATH=pythonpath))
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference_dir = tmp_path / "reference" / "lightning_logs" / "version_0"

    interrupted = fit_command(tmp_path / "runs", f"--trainer.callbacks+={json.dumps(kill)}", devices=devices)
    killed = run(interrupted, base_env(PYTHONPATH=pythonpath))
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert load_record(run_dir)["status"] == "RUNNING"  # SIGKILL: the process had no chance to say anything
    killed_pid = int((tmp_path / "killed").read_text().split()[1])
    assert load_record(run_dir)["heartbeat"]["pid"] == killed_pid  # rank 0 kept the heartbeat until it died
    assert runs.load(tmp_path / "runs")["status"].tolist() == [runs.DIED]  # its pid is gone on this host
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == kill_step - 1  # killed before that step's save

    resumed = run([*interrupted, f"--ckpt_path={last}"], base_env(PYTHONPATH=pythonpath))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in run_dir.parent.iterdir()] == ["version_0"]  # the same run folder, no version_1
    ours, theirs = training_state(last), training_state(reference_dir / "checkpoints" / "last.ckpt")
    difference = max_difference(ours, theirs)
    print(f"\n{devices} process(es): killed at step {kill_step}, resumed at {kill_step - 1}: max |diff| {difference}")
    for name, tensor in ours.items():  # equal to the bit, not within rounding
        assert torch.equal(tensor, theirs[name]), name

    record = load_record(run_dir)
    jsonschema.validate(record, load_schema(), format_checker=jsonschema.FormatChecker())
    assert record["status"] == COMPLETED and runs.status(record) == COMPLETED
    (resume,) = record["resumes"]
    assert resume["checkpoint"] == str(last.resolve()) and resume["step"] == kill_step - 1
    assert "--ckpt_path" not in " ".join(record["command"]) and f"--ckpt_path={last}" in resume["command"]
    # metrics.csv continues: every step logged once, with the uninterrupted run's values (the
    # interrupted epoch's train/*_epoch means include the batches from before the kill)
    assert (run_dir / "metrics.csv").read_text() == (reference_dir / "metrics.csv").read_text()


def test_the_one_process_train_loader_resumes_at_the_next_batch():
    # Lightning saves a loader's state_dict() in mid-epoch checkpoints only if it has one; a plain
    # DataLoader restarted the interrupted epoch at batch 0
    def loader():
        datamodule = IS2REDataModule.from_devset(batch_size=8)
        datamodule.setup("fit")
        train = datamodule.train_dataloader()
        train.sampler.set_epoch(2)  # what Lightning does each epoch
        return train

    uninterrupted = [batch.sid.tolist() for batch in loader()]
    interrupted = loader()
    seen = []
    for batch in interrupted:
        seen.append(batch.sid.tolist())
        if len(seen) == 3:
            break
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    assert seen + [batch.sid.tolist() for batch in resumed] == uninterrupted
    assert len(uninterrupted) > 3 and len({s for b in uninterrupted for s in b}) == len(resumed.dataset)


def test_a_resumed_record_says_resumed_then_completed_with_the_resume(tmp_path):
    StepRecord(tmp_path, "fit", command=["matsciml", "fit"]).save()
    record = StepRecord.reopen(tmp_path)
    assert load_record(tmp_path)["status"] == "RUNNING"  # reopening alone writes nothing
    record.note_resume(tmp_path / "checkpoints" / "last.ckpt", 7, 1, ["matsciml", "fit", "--ckpt_path=last.ckpt"])
    assert load_record(tmp_path)["status"] == RESUMED
    record.finish(COMPLETED)
    saved = load_record(tmp_path)
    jsonschema.validate(saved, load_schema(), format_checker=jsonschema.FormatChecker())
    assert saved["status"] == COMPLETED and saved["command"] == ["matsciml", "fit"]
    assert [(r["step"], r["epoch"], r["command"][-1]) for r in saved["resumes"]] == [(7, 1, "--ckpt_path=last.ckpt")]


def _beating_record(directory: Path, **heartbeat) -> None:
    record = StepRecord(directory, "fit")
    record.beat()
    record.data["heartbeat"].update(heartbeat)
    record.save()


def test_runs_list_shows_a_running_record_whose_process_died_as_died(tmp_path):
    # a real process writes its record and heartbeat, then dies by SIGKILL (its pid is then gone)
    dead = tmp_path / "killed"
    script = (
        "import os, signal, sys; from matsciml.records.provenance import StepRecord; "
        "r = StepRecord(sys.argv[1], 'fit'); r.beat(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", script, str(dead)], env=env, timeout=60).returncode == -9
    _beating_record(tmp_path / "alive")  # this process: alive
    stale = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=runs.DIED_AFTER_S + 1)).isoformat()
    _beating_record(tmp_path / "elsewhere-stale", hostname="another-node", at=stale)
    _beating_record(tmp_path / "elsewhere-fresh", hostname="another-node", pid=1)
    StepRecord(tmp_path / "no-heartbeat", "fit").save()  # a record from before heartbeats: unknown, left alone
    finished = StepRecord(tmp_path / "finished", "fit")
    finished.data["heartbeat"] = load_record(dead)["heartbeat"]  # a dead pid, but the run ended properly
    finished.finish(COMPLETED)

    shown = dict(zip(*(runs.load(tmp_path)[c] for c in ("run", "status")), strict=True))
    assert shown == {
        "killed": runs.DIED,
        "alive": "RUNNING",
        "elsewhere-stale": runs.DIED,
        "elsewhere-fresh": "RUNNING",
        "no-heartbeat": "RUNNING",
        "finished": COMPLETED,
    }
    listed = subprocess.run(
        [str(Path(sys.executable).with_name("matsciml")), "runs", "list", str(dead)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and " DIED " in listed.stdout, listed.stderr


def test_checkpoint_every_n_steps_refuses_what_is_not_a_positive_count():
    assert step_checkpoint(3)._every_n_train_steps == 3
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="--checkpoint_every_n_steps"):
            step_checkpoint(bad)


def test_a_checkpoint_in_a_run_folder_pins_the_logger_unless_a_version_is_given(tmp_path):
    from jsonargparse import Namespace

    from matsciml.trainer.resume import pin_run_to_checkpoint

    run_dir = tmp_path / "runs" / "lightning_logs" / "version_3"
    (run_dir / "checkpoints").mkdir(parents=True)
    StepRecord(run_dir, "fit").save()
    last = run_dir / "checkpoints" / "last.ckpt"

    def trainer(**init_args):
        return Namespace(
            logger=Namespace(class_path="matsciml.trainer.loggers.CSVLogger", init_args=Namespace(**init_args))
        )

    unset = trainer(save_dir="elsewhere")
    assert pin_run_to_checkpoint(unset, last) == run_dir.resolve()
    assert (unset.logger.init_args.save_dir, unset.logger.init_args.name, unset.logger.init_args.version) == (
        str(tmp_path.resolve() / "runs"),
        "lightning_logs",
        "version_3",
    )
    explicit = trainer(save_dir="elsewhere", version="mine")  # the user named the run: theirs wins
    assert pin_run_to_checkpoint(explicit, last) is None and explicit.logger.init_args.version == "mine"
    loose = tmp_path / "model.ckpt"  # a checkpoint outside a run folder: a new run, as before
    assert pin_run_to_checkpoint(trainer(), loose) is None


@pytest.mark.filterwarnings("ignore:You requested to overfit:UserWarning")
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
def test_overfit_batches_still_trains_on_the_data_module():
    # Lightning replaces the train sampler by a SequentialSampler when overfitting; it cannot rebuild
    # the stateful batch-sampler loader, so overfitting gets a plain one
    import lightning.pytorch as pl
    from helpers.training import tiny_egnn

    from matsciml.tasks import IS2RETask

    datamodule = IS2REDataModule.from_devset(batch_size=8)
    datamodule.setup("fit")
    task = IS2RETask(tiny_egnn(), statistics=datamodule.target_statistics)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        overfit_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 4


def test_generator_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    # what ResumeState saves must load with torch.load(weights_only=True), as --ckpt_path is read
    import numpy as np

    from matsciml.trainer.resume import rng_states, set_rng_states

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch.save({"rng": rng_states()}, tmp_path / "state.ckpt")
    drawn = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    set_rng_states(torch.load(tmp_path / "state.ckpt", weights_only=True)["rng"])
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]
