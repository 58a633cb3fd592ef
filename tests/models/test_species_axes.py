"""Every model declares its species-indexed tensors: grown to more species from a parent, it predicts exactly
what the parent does on the parent's elements, and the new slices keep their fresh initialisation."""

from __future__ import annotations

import pytest
import torch
from helpers.physics import slab
from torch import nn

from matsciml.data.batch import Batch
from matsciml.data.structures import batch_from_atoms
from matsciml.models import EGNN, MACE, Gala, MegNet, NequIP
from matsciml.models.species_axes import SpeciesAxis, species_axes
from matsciml.tasks.init_from import match_weights

MODELS = {
    "egnn": lambda n: EGNN(cutoff=5.0, hidden=8, num_layers=1, projection_hidden=8, num_species=n),
    "megnet": lambda n: MegNet(
        cutoff=5.0, num_blocks=1, dense_sizes=(8, 8), conv_sizes=(8, 8), num_gaussians=8, num_species=n
    ),
    "nequip": lambda n: NequIP(cutoff=5.0, num_layers=1, num_features=4, radial_hidden=(8,), num_species=n),
    "mace": lambda n: MACE(cutoff=5.0, num_features=4, hidden_l_max=1, sh_l_max=2, radial_hidden=[8], num_species=n),
    "gala": lambda n: Gala(hidden=8, num_blocks=1, num_species=n),
}


def batch_for(model, width: int) -> Batch:
    """A Cu/O slab (Z 8 and 29) in float64; point clouds get one-hot features ``width`` wide."""
    if model.representation == "graph":
        return batch_from_atoms([slab()], cutoff=5.0, dtype=torch.float64)
    batch = batch_from_atoms([slab()], dtype=torch.float64, representation="point_cloud")
    features = batch.point_features
    padded = torch.nn.functional.pad(features, (0, width - features.shape[-1]))
    return Batch(**{**dict(batch.items()), "point_features": padded})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_model_grown_to_more_species_predicts_what_its_parent_did(name):
    old, new = (100, 110) if name == "gala" else (40, 60)  # Gala's data one-hot is 100 wide
    torch.manual_seed(0)
    parent = MODELS[name](old).double().eval()
    torch.manual_seed(1)
    child = MODELS[name](new).double().eval()
    fresh = {k: v.clone() for k, v in child.state_dict().items()}
    merged, report = match_weights(child.state_dict(), parent.state_dict(), species_axes(child))
    child.load_state_dict(merged)
    assert report["extended"] and report["new"] == report["dropped"] == []
    for key in report["extended"]:
        axis = species_axes(child)[key]
        grown, before = child.state_dict()[key], parent.state_dict()[key]
        blocks_new = grown.unflatten(axis.dim, (axis.blocks, -1))
        blocks_fresh = fresh[key].unflatten(axis.dim, (axis.blocks, -1))
        kept = before.shape[axis.dim] // axis.blocks
        assert torch.equal(blocks_new.narrow(axis.dim + 1, 0, kept), before.unflatten(axis.dim, (axis.blocks, -1)))
        rest = blocks_new.shape[axis.dim + 1] - kept
        assert torch.equal(blocks_new.narrow(axis.dim + 1, kept, rest), blocks_fresh.narrow(axis.dim + 1, kept, rest))
    with torch.no_grad():
        expected = parent(batch_for(parent, old))
        assert torch.equal(child(batch_for(child, new)), expected)


def test_fewer_species_or_other_changes_along_a_species_tensor_are_refused():
    axis = SpeciesAxis(dim=1, blocks=2)
    with pytest.raises(ValueError, match="4 species slices along dim 1 in the parent but only 3"):
        axis.extend(torch.zeros(2, 6), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="differ beyond species axis 1"):
        axis.extend(torch.zeros(3, 8), torch.zeros(2, 6))


def test_a_declaration_naming_no_tensor_of_the_module_is_refused():
    class Typo(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(5, 2)

        def species_indexed(self):
            return {"tabel.weight": SpeciesAxis()}

    with pytest.raises(ValueError, match="Typo.species_indexed\\(\\) declares 'tabel.weight'"):
        species_axes(nn.Sequential(Typo()))
