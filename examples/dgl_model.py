"""A research model written with DGL message passing, trained through matsciml's S2EF task.

The model subclasses :class:`~matsciml.models.AbstractEnergyModel`: it receives our ``Batch``
(whatever the DataModule yielded: native, DGL or PyG batches are converted once at the
model boundary), turns it into a batched ``dgl.DGLGraph`` with ``to_dgl`` and does its
message passing with ``dgl.function`` (``u_add_v``, ``copy_e``, ``sum``). Edge vectors
include the periodic offsets ``cell_shifts @ cell`` and are computed from the graph's
``pos`` inside the forward pass, so the task's autograd forces ``-dE/dpos`` are exact.

Run it (needs DGL: ``make test-dgl`` builds an environment, then
``.venv-dgl/bin/python examples/dgl_model.py``) to train a few steps on the S2EF devset.
"""

from __future__ import annotations

import argparse

import dgl
import dgl.function as fn
import torch
from torch import nn

from matsciml.data import S2EFDGLDataModule
from matsciml.data.backends import to_dgl
from matsciml.data.batch import Batch
from matsciml.models import AbstractEnergyModel
from matsciml.tasks import S2EFTask


class Interaction(nn.Module):
    """One message-passing step: ``m_ij = (W h_j + W h_i) * filter(r_ij) * envelope``, summed at ``i``."""

    def __init__(self, hidden: int, num_radial: int):
        super().__init__()
        self.pre = nn.Linear(hidden, hidden)
        self.filter = nn.Linear(num_radial, hidden)
        self.post = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, graph: dgl.DGLGraph, h: torch.Tensor, radial: torch.Tensor,
                envelope: torch.Tensor) -> torch.Tensor:
        with graph.local_scope():
            graph.ndata["h"] = self.pre(h)
            graph.apply_edges(fn.u_add_v("h", "h", "m"))  # u: neighbour j (source), v: centre i
            graph.edata["m"] = graph.edata["m"] * self.filter(radial) * envelope.unsqueeze(-1)
            graph.update_all(fn.copy_e("m", "m"), fn.sum("m", "aggregated"))
            return h + self.post(torch.cat([h, graph.ndata["aggregated"]], dim=-1))


class DGLEnergyModel(AbstractEnergyModel):
    """A small invariant message-passing potential in DGL; per-atom energies summed per structure.

    Args:
        hidden: node feature width.
        num_layers: message-passing steps.
        num_radial: Gaussian radial basis functions on ``[0, cutoff]``.
        num_species: atomic numbers embedded (1..num_species).
        cutoff: interaction radius in Å.
    """

    per_atom = True

    def __init__(self, hidden: int = 32, num_layers: int = 2, num_radial: int = 16, num_species: int = 100,
                 cutoff: float = 6.0):
        super().__init__(cutoff=cutoff)
        self.num_species = num_species
        self.embedding = nn.Embedding(num_species + 1, hidden)
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_radial))
        self.width = cutoff / num_radial
        self.layers = nn.ModuleList(Interaction(hidden, num_radial) for _ in range(num_layers))
        self.readout = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def energy(self, batch: Batch) -> torch.Tensor:
        graph = to_dgl(batch)  # shares pos with the batch: autograd reaches the task's positions
        source, destination = graph.edges()
        graph.apply_edges(fn.u_sub_v("pos", "pos", "relative"))  # pos[j] - pos[i]
        cell = graph.ndata["graph_cell"][destination]
        offsets = torch.einsum("ek,ekl->el", graph.edata["cell_shifts"].to(cell.dtype), cell)
        vectors = graph.edata["relative"] + offsets
        distances = torch.sqrt((vectors**2).sum(-1) + 1e-12)
        radial = torch.exp(-(((distances.unsqueeze(-1) - self.centres) / self.width) ** 2))
        envelope = self.cosine_cutoff(distances, self.cutoff)
        h = self.embedding(graph.ndata["atomic_numbers"])
        for layer in self.layers:
            h = layer(graph, h, radial, envelope)
        return self.readout(h).squeeze(-1)  # (num_atoms,), summed per structure by the base class


def train(max_steps: int = 20, batch_size: int = 4, lr: float = 3e-3, **trainer_kwargs):
    """A few S2EF steps on the devset with DGL batches; returns ``(task, trainer, datamodule)``."""
    import lightning.pytorch as pl

    data = S2EFDGLDataModule.from_devset(batch_size=batch_size)
    task = S2EFTask(DGLEnergyModel(hidden=16, num_layers=2, num_radial=8, cutoff=data.cutoff), lr=lr)
    settings = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2)
    trainer = pl.Trainer(**{**settings, **trainer_kwargs})
    trainer.fit(task, datamodule=data)
    return task, trainer, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    _, trainer, _ = train(args.max_steps, args.batch_size)
    for name, value in sorted(trainer.callback_metrics.items()):
        print(f"{name:<28} {float(value):.4f}")


if __name__ == "__main__":
    main()
