"""MegNet passes the shared physics battery, keeps the toolkit paper's sizes and reads out per structure."""

import pytest
import torch
from ase import Atoms
from helpers.physics import PhysicsBattery, energy_and_forces, isolated_atom, molecule_like, slab, small_bulk

from matsciml.data.structures import batch_from_atoms
from matsciml.models.megnet import MegNet, Set2Set, _Graph, segment_softmax


def small_megnet(cutoff: float = 5.0, **kwargs) -> MegNet:
    sizes = dict(
        num_blocks=2,
        dense_sizes=(32, 16),
        conv_sizes=(32, 32, 16),
        num_gaussians=32,
        set2set_layers=2,
        set2set_steps=3,
        output_sizes=(16, 8),
    )
    return MegNet(cutoff=cutoff, **{**sizes, **kwargs})


class TestMegNet(PhysicsBattery):
    def make_model(self):
        return small_megnet(cutoff=self.cutoff)

    def test_atoms_farther_apart_than_the_cutoff_add_their_energies(self, model):
        # not what MegNet does: its energy is natoms x an intensive head over the whole structure
        # (global state and Set2Set readout), so atoms out of each other's reach still share it and
        # unlike atoms do not add. What holds: no force without an edge, and like atoms do add
        # (the mean over identical atoms is each one's).
        reach = self.cutoff + 4.0
        unlike = Atoms("CuO", positions=[[0, 0, 0], [reach, 0, 0]], pbc=False)
        like = Atoms("Cu2", positions=[[0, 0, 0], [reach, 0, 0]], pbc=False)
        (pair, forces), (two, _) = (energy_and_forces(model, self.batch([s])) for s in (unlike, like))
        atoms = energy_and_forces(model, self.batch([isolated_atom("Cu"), isolated_atom("O")]))[0]
        assert torch.equal(forces, torch.zeros_like(forces))
        assert torch.allclose(two[0], 2 * atoms[0], atol=1e-10, rtol=1e-10)
        assert not torch.allclose(pair[0], atoms.sum(), atol=1e-6), "the global state couples them"


def graph(structures, cutoff=5.0, dtype=torch.float64):
    return batch_from_atoms(structures, cutoff=cutoff, max_neighbors=None, dtype=dtype)


def test_paper_sized_defaults():
    model = MegNet()
    assert len(model.blocks) == 4 and model.cutoff == 6.0
    assert model.embedding.embedding_dim == 5 and model.initial_state.shape == (9,)
    block = model.blocks[1]
    assert [m.out_features for m in block.node_dense if isinstance(m, torch.nn.Linear)] == [128, 64]
    assert [m.out_features for m in block.phi_e if isinstance(m, torch.nn.Linear)] == [128, 128, 64]
    assert block.residual and not model.blocks[0].residual  # the first adds its pre-layers' output instead
    assert model.node_readout.lstm.num_layers == 5 and model.node_readout.steps == 4
    assert model.edge_readout.lstm.num_layers == 5 and model.edge_readout.steps == 4
    assert [m.out_features for m in model.output if isinstance(m, torch.nn.Linear)] == [64, 16, 1]
    assert model.blocks[0].dropout.p == 0.1
    assert 1_000_000 < model.num_parameters() < 1_400_000  # paper: about 1 M


def test_float32_and_float64_both_work():
    torch.manual_seed(0)
    model = small_megnet().eval()
    energy32 = model(graph([slab(), molecule_like()], dtype=torch.float32))
    energy64 = model.double()(graph([slab(), molecule_like()]))
    assert energy32.dtype == torch.float32 and energy64.dtype == torch.float64
    assert torch.allclose(energy32.double(), energy64, atol=1e-4)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        MegNet(activation="relu")
    with pytest.raises(ValueError, match="cutoff must be positive"):
        MegNet(cutoff=0)
    with pytest.raises(ValueError, match="num_blocks must be a positive integer"):
        MegNet(num_blocks=0)
    with pytest.raises(ValueError, match="set2set_steps must be a positive integer"):
        MegNet(set2set_steps=0)
    with pytest.raises(ValueError, match="conv_sizes must be a non-empty list"):
        MegNet(conv_sizes=())
    with pytest.raises(ValueError, match="dense_sizes must be a non-empty list"):
        MegNet(dense_sizes=(64, -1))
    with pytest.raises(ValueError, match=r"dense_sizes\[-1\] \(32\) must equal conv_sizes\[-1\] \(64\)"):
        MegNet(dense_sizes=(128, 32))
    with pytest.raises(ValueError, match="dropout must be in"):
        MegNet(dropout=1.0)
    with pytest.raises(ValueError, match="gaussian_width must be positive"):
        MegNet(gaussian_width=0.0)
    model = small_megnet(num_species=10)
    with pytest.raises(ValueError, match="exceeds num_species=10"):
        model(graph([slab()], dtype=torch.float32))  # Cu, Z = 29


def test_segment_softmax_sums_to_one_per_structure():
    torch.manual_seed(0)
    index = torch.tensor([0, 0, 0, 2, 2, 3])  # segment 1 is empty
    logits = torch.randn(6, dtype=torch.float64) * 50
    attention = segment_softmax(logits, index, 4)
    sums = torch.zeros(4, dtype=torch.float64).index_add(0, index, attention)
    assert torch.allclose(sums, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    weights = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.3, 1.0], dtype=torch.float64)
    weighted = segment_softmax(logits, index, 4, weights)
    sums = torch.zeros(4, dtype=torch.float64).index_add(0, index, weighted)
    assert weighted[1] == 0 and torch.allclose(sums, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))


def test_set2set_readout_respects_structure_boundaries():
    torch.manual_seed(0)
    readout = Set2Set(8, num_layers=2, steps=3).double()
    x = torch.randn(7, 8, dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    together = readout(x, index, 2)
    assert torch.allclose(together[0], readout(x[:3], index[:3], 1)[0], atol=1e-12)
    assert torch.allclose(together[1], readout(x[3:], index[3:] - 1, 1)[0], atol=1e-12)
    changed = x.clone()
    changed[4:] += 1.0
    assert torch.equal(readout(changed, index, 2)[0], together[0])
    # repeating every element of a structure leaves its readout unchanged (the supercell case)
    repeated = readout(torch.cat([x[:3], x[:3]]), torch.zeros(6, dtype=torch.long), 1)
    assert torch.allclose(repeated[0], together[0], atol=1e-12)


def test_edge_features_follow_positions_in_the_forward_pass():
    torch.manual_seed(0)
    model = small_megnet().double().eval()
    batch = graph([small_bulk()])
    positions = batch.positions.clone().requires_grad_(True)
    energy = model(batch.replace(positions=positions))
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    assert gradient.abs().max() > 1e-6
    moved = batch.positions.clone()
    moved[0, 0] += 0.05
    assert not torch.allclose(model(batch.replace(positions=moved)), energy.detach())


def test_an_edge_at_the_cutoff_counts_for_nothing():
    # with plain means or an unweighted edge readout, an edge entering the graph would make
    # the energy jump however small its (envelope-scaled) Gaussian features
    torch.manual_seed(0)
    model = small_megnet(cutoff=3.0).double().eval()
    atoms = Atoms("CuOH", positions=[[0, 0, 0], [1.8, 0, 0], [3.0 - 1e-6, 0.0, 0.0]], pbc=False)
    with_edge, without_edge = graph([atoms], cutoff=3.0), graph([atoms], cutoff=2.9)
    assert with_edge.num_edges == without_edge.num_edges + 2  # Cu-H both ways
    energy_with, forces_with = energy_and_forces(model, with_edge)
    energy_without, forces_without = energy_and_forces(model, without_edge)
    assert abs(float(energy_with - energy_without)) < 1e-10
    assert float((forces_with - forces_without).abs().max()) < 1e-5
    assert float(forces_with.abs().max()) > 1e-3


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = small_megnet(dropout=0.5).double()
    batch = graph([slab()])
    model.train()
    assert not torch.equal(model(batch), model(batch))
    model.eval()
    assert torch.equal(model(batch), model(batch))


def test_split_first_edge_layer_equals_the_concatenated_one():
    torch.manual_seed(0)
    model = small_megnet().double()
    block = model.blocks[1]
    batch = graph([slab(), molecule_like()])
    weights = torch.rand(batch.num_edges, dtype=torch.float64)
    structure_graph = _Graph(batch, weights)
    v, e, u = (torch.randn(n, 16, dtype=torch.float64) for n in (batch.num_atoms, batch.num_edges, 2))
    j, i = batch.edge_index
    concatenated = block.phi_e[0](torch.cat([v[i], v[j], e, u[structure_graph.edge_structure]], dim=-1))
    assert torch.allclose(block._phi_e_first_layer(v, e, u, structure_graph), concatenated, atol=1e-12)


def test_default_sized_model_is_extensive():
    # the battery runs a narrow model; the supercell check again at the default sizes
    torch.manual_seed(0)
    model = MegNet(cutoff=5.0).double().eval()
    atoms = small_bulk()
    energy, forces = energy_and_forces(model, graph([atoms]))
    energy_super, forces_super = energy_and_forces(model, graph([atoms.repeat((2, 2, 1))]))
    assert torch.allclose(energy_super, 4 * energy, atol=1e-8, rtol=1e-10)
    assert torch.allclose(forces_super, forces.repeat(4, 1), atol=1e-9)
    assert float(forces.abs().max()) > 1e-5  # far above atol: the check is not vacuous (last layer starts small)


def test_set2set_lstm_runs_in_float32_under_cpu_autocast():
    # oneDNN has no bf16 LSTM on many CPUs ("could not create a primitive descriptor for the LSTM
    # forward propagation primitive"): under CPU autocast the readouts' LSTMs must see float32
    model = small_megnet().eval()
    seen = []
    for readout in (model.node_readout, model.edge_readout):
        readout.lstm.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out[0].dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        energy = model(graph([slab(), small_bulk()], dtype=torch.float32))
    assert energy.dtype == torch.float32 and torch.isfinite(energy).all()
    assert seen and set(seen) == {(torch.float32, torch.float32)}
