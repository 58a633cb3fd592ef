"""Input errors are one ``matsciml: error:`` line and exit 2 on every subcommand; bugs keep their traceback.

Each case injects one fault a user meets (a corrupt record read by a DataLoader worker, a truncated
split, a missing or corrupt checkpoint, a refused config value) into a real run of the command.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from matsciml.cli.app import main
from matsciml.cli.errors import DEBUG_ENV, input_error
from matsciml.data.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--config",
    "configs/devset/s2ef-egnn.yaml",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def error_lines(capsys) -> tuple[list[str], str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("matsciml: error:")], err


def assert_one_line(capsys, *expected: str) -> str:
    lines, err = error_lines(capsys)
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def corrupt_record(split: Path, key: bytes = b"1") -> Path:
    """Overwrite the magic bytes of record ``key`` in the split's first shard; returns the shard."""
    shard = sorted(split.glob("*.lmdb"))[0]
    env = lmdb.open(str(shard), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        value = txn.get(key)
        txn.put(key, b"XXXX" + value[4:])
    env.close()
    return shard


@pytest.fixture(scope="module")
def corrupt_val(tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the S2EF devset's validation split with record 1 corrupted, and its shard."""
    split = tmp_path_factory.mktemp("corrupt") / "val"
    shutil.copytree(ROOT / "devsets/s2ef/val", split)
    return split, corrupt_record(split)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint from a one-batch ``matsciml fit``."""
    save_dir = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        assert main(["fit", *QUICK, f"--trainer.logger.init_args.save_dir={save_dir}"]) == 0
    return save_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def test_a_corrupt_record_read_in_a_dataloader_worker_is_one_line(corrupt_val, tmp_path, monkeypatch, capsys):
    split, shard = corrupt_val
    monkeypatch.chdir(ROOT)
    argv = [*QUICK, f"--data.init_args.val_path={split}", "--data.init_args.num_workers=1"]
    assert main(["fit", *argv, f"--trainer.default_root_dir={tmp_path}"]) == 2
    # torch re-raised it as "Caught DataError in DataLoader worker process 0 ..."; the line is the original
    assert_one_line(capsys, f"{shard}, record 1", "bad magic bytes")
    assert "DataLoader worker" not in capsys.readouterr().err


def test_a_truncated_split_on_validate_is_one_line(tmp_path, monkeypatch, capsys):
    split = tmp_path / "val"
    shutil.copytree(ROOT / "devsets/s2ef/val", split)
    shard = sorted(split.glob("*.lmdb"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    monkeypatch.chdir(ROOT)
    argv = [*QUICK, f"--data.init_args.val_path={split}", f"--trainer.default_root_dir={tmp_path}"]
    assert main(["validate", *argv]) == 2
    assert_one_line(capsys, str(shard), "truncated")


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_a_missing_checkpoint_is_one_line(subcommand, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    missing = tmp_path / "missing.ckpt"
    argv = [subcommand, *QUICK, f"--ckpt_path={missing}", f"--trainer.default_root_dir={tmp_path}"]
    assert main(argv) == 2
    assert_one_line(capsys, str(missing))


def test_a_truncated_checkpoint_is_one_line_in_validate_and_predict_structures(
    checkpoint, tmp_path, monkeypatch, capsys
):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(checkpoint.read_bytes()[:1000])
    monkeypatch.chdir(ROOT)
    assert main(["validate", *QUICK, f"--ckpt_path={broken}", f"--trainer.default_root_dir={tmp_path}"]) == 2
    assert_one_line(capsys, str(broken))
    from ase.build import bulk
    from ase.io import write

    write(tmp_path / "in.xyz", bulk("Cu", cubic=True))
    argv = ["predict-structures", str(broken), str(tmp_path / "in.xyz"), "--out", str(tmp_path / "out.xyz")]
    assert main(argv) == 2
    assert_one_line(capsys, str(broken))


def test_a_corrupt_package_is_one_line_in_predict_structures(tmp_path, capsys):
    from ase.build import bulk
    from ase.io import write

    write(tmp_path / "in.xyz", bulk("Cu", cubic=True))
    package = tmp_path / "model.zip"
    package.write_bytes(b"not a zip")
    argv = ["predict-structures", str(package), str(tmp_path / "in.xyz"), "--out", str(tmp_path / "out.xyz")]
    assert main(argv) == 2
    assert_one_line(capsys, str(package))


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--data.init_args.batch_size=0", "batch_size must be a positive integer, got 0"),  # refused by the class
        ("--trainer.max_epochs=abc", 'Parser key "trainer.max_epochs"'),  # refused by the parser
        ("--model.init_args.no_such_option=1", "no_such_option"),
    ],
)
def test_a_bad_config_value_is_one_line(option, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["fit", *QUICK, option, f"--trainer.default_root_dir={tmp_path}"]) == 2
    assert_one_line(capsys, expected)


def test_data_export_runs_and_hpo_errors_are_one_line(corrupt_val, tmp_path, capsys):
    split, shard = corrupt_val
    assert main(["data", "check", str(split)]) == 2
    assert_one_line(capsys, f"{shard}, record 1")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["export", str(garbage), "--out", str(tmp_path / "m.msml")]) == 2
    assert_one_line(capsys, str(garbage))
    assert main(["runs", "show", str(tmp_path / "no-run")]) == 2
    assert_one_line(capsys, "no-run")
    missing = tmp_path / "missing.yaml"
    assert main(["hpo", "--config", str(missing), "--space", str(missing), "--trials", "1"]) == 2
    assert_one_line(capsys, "missing.yaml")


def test_usage_errors_outside_argparse_are_one_line_with_status_2(capsys):
    assert main(["fit", "--trust-module"]) == 2  # was SystemExit("..."): status 1
    assert_one_line(capsys, "--trust-module needs a module name")
    assert main(["data", "info"]) == 2
    assert_one_line(capsys, "give a dataset PATH or --devset TASK")


@pytest.mark.parametrize("where", ["before", "after", "environment"])
def test_debug_shows_the_traceback_too(where, corrupt_val, monkeypatch, capsys):
    split, shard = corrupt_val
    argv = ["data", "check", str(split)]
    if where == "before":
        argv.insert(0, "--debug")
    elif where == "after":
        argv.append("--debug")
    else:
        monkeypatch.setenv(DEBUG_ENV, "1")
    assert main(argv) == 2
    lines, err = error_lines(capsys)
    assert len(lines) == 1 and f"{shard}, record 1" in lines[0]
    assert "Traceback (most recent call last)" in err and "DataError" in err
    assert os.environ.get(DEBUG_ENV) == ("1" if where == "environment" else None)  # the flag does not leak


def test_debug_reaches_lightning_runs_as_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = ["fit", "--debug", *QUICK, "--data.init_args.batch_size=0", f"--trainer.default_root_dir={tmp_path}"]
    assert main(argv) == 2  # LightningCLI never saw --debug (it would refuse an unknown option)
    lines, err = error_lines(capsys)
    assert len(lines) == 1 and "Traceback" in err and "batch_size must be a positive integer" in err


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    import matsciml.data.info

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(matsciml.data.info, "describe", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["data", "info", str(tmp_path)])


def test_a_bug_inside_a_training_run_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    boom = '--trainer.callbacks+={"class_path": "helpers.interrupts.RaiseAtStep", "init_args": {"step": 1}}'
    with pytest.raises(RuntimeError, match="deliberate failure"):
        main(["fit", *QUICK, boom, f"--trainer.default_root_dir={tmp_path}"])


def test_the_worker_error_is_recovered_from_torchs_re_raise():
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("/data/x.lmdb", "value is not a matsciml record", record=7)
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(RuntimeError) as caught:  # DataError(message) cannot be built: torch falls back
        wrapped.reraise()
    assert "\n" in str(caught.value)
    assert input_error(caught.value) == "/data/x.lmdb, record 7: value is not a matsciml record"
    try:
        raise ZeroDivisionError("a bug in a worker")
    except ZeroDivisionError:
        bug = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ZeroDivisionError) as caught:
        bug.reraise()
    assert input_error(caught.value) is None


def test_the_console_script_exits_2_with_one_line(corrupt_val):
    split, shard = corrupt_val
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "matsciml", "data", "check", str(split)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("matsciml: error: ") and "Traceback" not in done.stderr


def test_a_full_disk_under_any_writer_is_an_input_error():
    # Lightning writes metrics.csv and config.yaml itself; torch.save raises RuntimeError from the OSError
    assert input_error(OSError(28, "No space left on device", "/runs/metrics.csv")) == (
        "no space left on device writing /runs/metrics.csv; free some space and run again"
    )
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as err:
        assert input_error(err) == "no space left on device: [Errno 28] No space left on device"
    assert input_error(OSError(5, "Input/output error")) is None  # other I/O errors stay tracebacks


@pytest.mark.slow
def test_an_input_error_on_one_ddp_rank_is_one_line_for_the_job(corrupt_val, tmp_path):
    """The rank that reads the bad record prints the line; the one that then loses its peer exits 2 quietly."""
    import socket

    split, shard = corrupt_val
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    drop = ("SLURM_", "MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC", "PL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    argv = [*QUICK, "--config=configs/trainer/ddp.yaml", "--trainer.accelerator=cpu", "--trainer.devices=2"]
    argv += ["--trainer.limit_val_batches=2", f"--data.init_args.val_path={split}", "--data.init_args.num_workers=1"]
    done = subprocess.run(
        [sys.executable, "-m", "matsciml", "fit", *argv, f"--trainer.default_root_dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("matsciml: error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and f"{shard}, record 1" in lines[0] and "Traceback" not in done.stderr
