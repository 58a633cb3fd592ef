"""EGNN passes the shared physics battery and keeps the paper's sizes."""

import pytest
from helpers.physics import PhysicsBattery

from matsciml.models import EGNN


class TestEGNN(PhysicsBattery):
    def make_model(self):
        return EGNN(cutoff=self.cutoff)


def test_paper_sized_defaults():
    model = EGNN()
    assert len(model.layers) == 3 and model.num_parameters() < 72_000  # paper: 72k with a position MLP
    assert model.layers[0].edge_mlp[0].out_features == 16 and model.layers[0].node_mlp[0].out_features == 48


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        EGNN(activation="gelu")
    with pytest.raises(ValueError, match="cutoff must be positive"):
        EGNN(cutoff=0)
