"""``compile`` on a task: torch.compile'd energy models give the eager model's numbers.

Most tests use the ``aot_eager`` backend (Dynamo capture + AOTAutograd, no code generation) so they
take seconds; one runs the default inductor backend through the CLI, as ``compile: true`` does.
"""

from pathlib import Path

import pytest
import torch
from helpers.training import quiet_trainer, tiny_egnn

from matsciml.cli.app import main
from matsciml.data.datamodules import IS2REDataModule, S2EFDataModule
from matsciml.tasks import IS2RETask, S2EFTask

ROOT = Path(__file__).resolve().parents[2]
AOT = {"backend": "aot_eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    yield
    torch._dynamo.reset()  # compiled code holds on to its models; free them between tests


def test_compile_setting_is_checked():
    assert IS2RETask(tiny_egnn()).compile_options is None
    assert IS2RETask(tiny_egnn(), compile=True).compile_options == {"dynamic": True}
    assert IS2RETask(tiny_egnn(), compile=AOT).compile_options == {"dynamic": True, **AOT}
    with pytest.raises(TypeError, match="compile must be"):
        IS2RETask(tiny_egnn(), compile="yes")


def test_compiled_is2re_trains_and_matches_the_eager_model():
    torch.manual_seed(0)
    dm = IS2REDataModule.from_devset(batch_size=4, shuffle=False)
    task = IS2RETask(tiny_egnn(), compile=AOT, lr=3e-3)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2).fit(task, datamodule=dm)
    # training went through the compiled model (energy-only: one backward, which compile supports)
    assert "_compiled_model" in task.__dict__
    state = task.state_dict()
    assert state.keys() == before.keys()  # the compiled wrapper adds no parameters or key prefixes
    assert any(not torch.equal(state[k], before[k]) for k in state if k.startswith("model."))
    batch = next(iter(dm.val_dataloader()))
    task.eval()
    with torch.no_grad():
        compiled = task(batch)["energy"]
        eager = task.normalizer.denormalize(task.model(batch), batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_s2ef_trains_eagerly_and_evaluates_forces_compiled():
    torch.manual_seed(0)
    dm = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    task = S2EFTask(tiny_egnn(), compile=AOT)
    quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2).fit(task, datamodule=dm)
    reference = S2EFTask(tiny_egnn(), statistics=dm.target_statistics)
    reference.load_state_dict(task.state_dict())
    batch = next(iter(dm.val_dataloader()))
    task.eval(), reference.eval()
    with torch.inference_mode():  # as Lightning's validate and predict run it
        compiled, eager = task(batch), reference(batch)
    torch.testing.assert_close(compiled["energy"], eager["energy"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled["forces"], eager["forces"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
# importing inductor imports torch.utils.mkldnn, which uses a torch.jit API torch itself deprecates
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_true_from_a_config_runs_inductor(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert (
        main(
            [
                "fit",
                "--config",
                "configs/devset/is2re-egnn.yaml",
                "--model.init_args.compile=true",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=3",
                "--trainer.limit_val_batches=2",
                "--trainer.num_sanity_val_steps=0",
                "--trainer.log_every_n_steps=1",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )
        == 0
    )
    assert "energy MAE" in capsys.readouterr().out
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert checkpoint["hyper_parameters"]["compile"] is True
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])
