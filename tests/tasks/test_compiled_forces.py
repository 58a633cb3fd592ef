"""``compile: {forces: true}``: force training through one traced energy-and-forces graph.

The graphs are compiled with the ``aot_eager`` backend (AOTAutograd, no code generation), the part
of ``torch.compile`` that refuses double backward; inductor is exercised by
``experiments/bench_compile.py`` and the slow test at the end.
"""

from __future__ import annotations

import pytest
import torch
from helpers.training import quiet_trainer, tiny_egnn, tiny_megnet

from matsciml.data.batch import Batch
from matsciml.data.datamodules import S2EFDataModule
from matsciml.models.base import AbstractEnergyModel
from matsciml.tasks import S2EFTask
from matsciml.tasks.compiled_forces import CompiledForces
from matsciml.tasks.options import compile_forces, compile_options

AOT_FORCES = {"backend": "aot_eager", "forces": True}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    yield
    torch._dynamo.reset()


def float64(batch: Batch) -> Batch:
    return Batch({k: v.double() if v.is_floating_point() else v for k, v in batch.items()})


def devset_batches(*sizes: int) -> tuple[list[Batch], dict]:
    """Float64 devset training batches of ``sizes`` structures each (so atom and edge counts differ too)."""
    batches = []
    for size in sizes:
        dm = S2EFDataModule.from_devset(batch_size=size, shuffle=False)
        dm.setup("fit")
        batches.append(float64(next(iter(dm.train_dataloader()))))
    return batches, dm.target_statistics


def force_loss_gradients(task: S2EFTask, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    out = task(batch)
    loss = (out["energy"] ** 2).mean() + (out["forces"] ** 2).mean()
    gradients = torch.autograd.grad(loss, list(task.model.parameters()))
    return out["energy"].detach(), out["forces"].detach(), gradients


def test_forces_setting_is_checked():
    assert compile_forces(True) is False and compile_forces({"backend": "aot_eager"}) is False
    assert compile_forces(AOT_FORCES) is True
    assert compile_options(AOT_FORCES) == {"dynamic": True, "backend": "aot_eager"}  # not passed to torch.compile
    with pytest.raises(TypeError, match="compile.forces"):
        compile_forces({"forces": "yes"})


# MegNet's graph (set2set LSTMs unrolled) takes AOTAutograd about two minutes here
@pytest.mark.parametrize(
    "make_model", [tiny_egnn, pytest.param(tiny_megnet, marks=pytest.mark.slow)], ids=["egnn", "megnet"]
)
def test_compiled_energies_forces_and_weight_gradients_match_eager(make_model):
    batches, statistics = devset_batches(3, 2, 1)
    torch.manual_seed(0)
    model = make_model().double()
    compiled = S2EFTask(model, statistics=statistics, compile=AOT_FORCES).train()
    eager = S2EFTask(model, statistics=statistics).train()  # the same modules: the same weights
    for batch in batches:
        expected = force_loss_gradients(eager, batch)
        got = force_loss_gradients(compiled, batch)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)
        for g, e in zip(got[2], expected[2], strict=True):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    # batches of 3 and 2 structures ran through one traced graph (its sizes are symbols, not
    # constants); the single-structure batch, whose sizes of 1 a symbolic trace cannot cover, got its own
    (graphs,) = compiled.compiled_forces().graphs.values()
    assert len(graphs) == 2


def test_a_lightning_fit_trains_through_the_compiled_graph():
    torch.manual_seed(0)
    dm = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    task = S2EFTask(tiny_egnn(), compile=AOT_FORCES, lr=3e-3)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2).fit(task, datamodule=dm)
    traced = task.compiled_forces().graphs
    assert traced and all(graphs for graphs in traced.values())  # training steps took the compiled path
    state = task.state_dict()
    assert state.keys() == before.keys()  # nothing compiled lands in checkpoints
    assert any(not torch.equal(state[k], before[k]) for k in state if k.startswith("model."))
    assert torch.isfinite(task.trainer.callback_metrics["val/force_mae"])


def test_older_torch_trains_eagerly_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.2.1+cpu")
    with pytest.warns(UserWarning, match=r"needs torch >= 2.6, this is 2.2.1\+cpu; force training runs eagerly"):
        task = S2EFTask(tiny_egnn(), compile=AOT_FORCES)
    assert task.compiled_forces() is None and task.compile_options == {"dynamic": True, "backend": "aot_eager"}


class ReadsAValueBack(AbstractEnergyModel):
    """A model whose energy depends on a Python number read from a tensor, which no graph can hold."""

    per_atom = True

    def __init__(self):
        super().__init__(cutoff=6.0)
        self.weight = torch.nn.Parameter(torch.ones(()))

    def energy(self, batch: Batch) -> torch.Tensor:
        longest = float(self.edge_vectors(batch).norm(dim=1).max())
        return self.weight * (batch.positions**2).sum(dim=1) / longest


def test_a_model_that_reads_values_back_gets_a_clear_error():
    (batch,), _ = devset_batches(2)
    with pytest.raises(RuntimeError, match="cannot trace ReadsAValueBack: its energy reads a tensor's value back"):
        CompiledForces({"backend": "aot_eager"})(ReadsAValueBack().double(), batch)


def test_stress_training_stays_eager():
    assert S2EFTask(tiny_egnn(), regress_stress=True, compile=AOT_FORCES).compiled_forces() is None


def test_compiled_forces_need_no_task(monkeypatch):
    """The module on its own: raw energies and position gradients of any energy model; past
    ``MAX_GRAPHS`` graphs, batches that fit none are computed eagerly, with one warning."""
    monkeypatch.setattr("matsciml.tasks.compiled_forces.MAX_GRAPHS", 1)
    batches, _ = devset_batches(2, 1)
    model = tiny_egnn().double().eval()
    compiled = CompiledForces({"backend": "aot_eager"})
    for batch in batches:
        if batch.num_structures == 1:  # the single structure fits the graph of two structures not
            with pytest.warns(UserWarning, match="1 force graphs traced and this batch fits none"):
                raw, gradient = compiled(model, batch)
        else:
            raw, gradient = compiled(model, batch)
        positions = batch.positions.clone().requires_grad_(True)
        expected = model(batch.replace(positions=positions))
        (expected_gradient,) = torch.autograd.grad(expected.sum(), positions)
        torch.testing.assert_close(raw, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-12, atol=1e-12)
    assert [len(graphs) for graphs in compiled.graphs.values()] == [1]


@pytest.mark.slow
# importing inductor imports torch.utils.mkldnn, which uses a torch.jit API torch itself deprecates
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_compiles_megnets_float32_lstm():
    """Float32 on CPU, where an LSTM would be one oneDNN op that inductor's code cannot run (minutes)."""
    (batch,), statistics = devset_batches(2)
    batch = batch.to(dtype=torch.float32)
    torch.manual_seed(0)
    model = tiny_megnet()
    compiled = S2EFTask(model, statistics=statistics, compile={"forces": True}).train()
    eager = S2EFTask(model, statistics=statistics).train()
    expected, got = force_loss_gradients(eager, batch), force_loss_gradients(compiled, batch)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
    for g, e in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)
