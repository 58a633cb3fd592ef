"""What S2EF and IS2RE training share: the wrapped model, normalisation, optimiser, logging.

A task owns everything around an :class:`~matsciml.models.AbstractEnergyModel`: it turns
the model's raw output into eV through an :class:`EnergyNormalizer` (buffers, so saved in
checkpoints), computes losses in normalised units and logs every metric in eV and eV/Å.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from matsciml.data.backends import as_batch
from matsciml.data.batch import Batch
from matsciml.data.composition import fit_references, residual_moments
from matsciml.data.grouped_eval import validation_group
from matsciml.models.base import AbstractEnergyModel
from matsciml.tasks import init_from as parent_init
from matsciml.tasks.compiled_forces import CompiledForces, unsupported_reason
from matsciml.tasks.ema import EMAWeightAveraging
from matsciml.tasks.freezing import check_freeze, freezing_callbacks
from matsciml.tasks.metric_logging import log_weighted
from matsciml.tasks.normalizers import EnergyNormalizer
from matsciml.tasks.options import (
    check_datamodule,
    check_optimisation,
    check_references,
    compile_forces,
    compile_options,
    composition_sums,
    graph_record,
)

LossName = Literal["l1", "mse", "huber"]
_LOSSES = {
    "l1": torch.nn.functional.l1_loss,
    "mse": torch.nn.functional.mse_loss,
    "huber": torch.nn.functional.huber_loss,  # with the task's huber_delta
}
SchedulerName = Literal["exponential", "plateau"]


class AtomisticTask(pl.LightningModule):
    """Base of :class:`~matsciml.tasks.S2EFTask` and :class:`~matsciml.tasks.IS2RETask`.

    Args:
        model: the energy model (or its ``{"class_path", "init_args"}`` spec).
        lr: Adam learning rate.
        gamma: ExponentialLR decay per epoch (Lightning steps it once per epoch; ``scheduler="exponential"``).
        statistics: target statistics of the training split (``datamodule.target_statistics``,
            linked by the CLI); when ``None``, taken from the trainer's datamodule in ``setup``.
        species: atomic numbers in the data (linked by the CLI, else the datamodule's at ``setup("fit")``);
            checked against the model's ``num_species``; the only elements the ASE calculator accepts.
        element_references: reference energy in eV per atomic number, added to predictions, or
            ``"fit"``: fitted by least squares on the training split's composition (from its card's
            composition sums). Shift and scale are then statistics of the reference-subtracted
            energies, so an untrained model predicts the fit. Total energies only (S2EF).
        normalize: learn in normalised units (shift and scale from ``statistics``).
        loss: ``"l1"`` (default, as in the paper), ``"mse"`` or ``"huber"`` (quadratic below
            ``huber_delta``, linear above).
        compile: run the energy model through ``torch.compile``: ``True`` (with ``dynamic=True``,
            as graph sizes change every batch) or a dict of ``torch.compile`` keyword arguments
            (``backend``, ``mode``, ...). ``torch.compile`` refuses double backward, so passes that
            train on forces (S2EF training) stay eager, unless the dict sets ``forces: true``: then
            energy and forces are traced as one graph whose backward is first order, and that graph
            is compiled (:mod:`matsciml.tasks.compiled_forces`; torch >= 2.6, forces without stress).
        graph: ``{"cutoff", "max_neighbors"}`` of the radius graph the task was trained on; when
            ``None``, taken from the trainer's datamodule in ``setup("fit")``. Saved in checkpoints
            and exports; the calculator and batch prediction build the same graph (see
            :func:`matsciml.integrations.calculators.inference_graph`). ``None`` after training: point clouds.
        huber_delta: where the Huber loss turns from quadratic to linear, in normalised units (the
            energy scale: for S2EF the force-component std).
        scheduler: ``"exponential"`` (ExponentialLR with ``gamma``, per epoch) or ``"plateau"``
            (ReduceLROnPlateau on ``monitor``: the LR is multiplied by ``plateau_factor`` after
            ``plateau_patience`` validations without improvement).
        monitor: the validation metric that ``scheduler="plateau"`` and the best checkpoint
            (:class:`~matsciml.tasks.best_checkpoint.BestCheckpoint`) follow, lower is better;
            default ``val/force_mae`` when forces are trained, else ``val/energy_mae``.
        plateau_factor, plateau_patience: ReduceLROnPlateau's ``factor`` and ``patience``.
        ema_decay: keep an exponential moving average of the weights with this decay per optimiser
            step (e.g. 0.999); validation, checkpoints and so exports and calculators use it
            (:class:`~matsciml.tasks.ema.EMAWeightAveraging`). ``None``: no average.
        freeze, unfreeze_after_epochs: parameter name patterns (``model.embedding.*``) kept unchanged while
            fitting, trained from epoch ``unfreeze_after_epochs`` on (``None``: never); :mod:`matsciml.tasks.freezing`.
        init_from, keep_parent_references, pretrained_lr: fine-tuning (:mod:`matsciml.tasks.init_from`): a
            checkpoint, run folder or package whose weights the fit starts from; keep the parent's element
            references (else refit on the new data); the learning rate of the loaded parameters.
    """

    task: ClassVar[str]
    #: whether training differentiates the energy twice (a force loss)
    trains_forces: bool = False
    #: record field of the energy target
    energy_key: ClassVar[str]
    #: whether the energy target scales with the number of atoms (shift per atom)
    extensive: ClassVar[bool]

    def __init__(
        self,
        model: AbstractEnergyModel,
        lr: float = 1e-3,
        gamma: float = 0.9,
        statistics: dict | None = None,
        species: list[int] | None = None,
        element_references: dict[int, float] | Literal["fit"] | None = None,
        normalize: bool = True,
        loss: LossName = "l1",
        compile: bool | dict[str, Any] = False,
        graph: dict[str, Any] | None = None,
        huber_delta: float = 1.0,
        scheduler: SchedulerName = "exponential",
        monitor: str | None = None,
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
        ema_decay: float | None = None,
        freeze: list[str] | None = None,
        unfreeze_after_epochs: int | None = None,
        init_from: str | None = None,
        keep_parent_references: bool = False,
        pretrained_lr: float | None = None,
    ):
        super().__init__()
        if isinstance(model, Mapping):
            model = AbstractEnergyModel.from_spec(dict(model))
        if not isinstance(model, AbstractEnergyModel):
            raise TypeError(f"model must be an AbstractEnergyModel, got {type(model).__name__}")
        check_optimisation(lr, gamma, loss, sorted(_LOSSES), huber_delta, scheduler, plateau_factor, plateau_patience)
        self.huber_delta, self.scheduler = float(huber_delta), scheduler
        self.plateau_factor, self.plateau_patience = float(plateau_factor), int(plateau_patience)
        self.monitor = self._check_monitor(monitor)
        self.ema_decay = ema_decay
        if ema_decay is not None:
            EMAWeightAveraging(ema_decay)  # checks the value now, not when training starts
        parent_init.set_settings(self, init_from, keep_parent_references, pretrained_lr, element_references)
        self.model = model
        # not self.freeze: LightningModule.freeze() freezes the whole module
        self.freeze_patterns, self.unfreeze_after_epochs = check_freeze(
            freeze, unfreeze_after_epochs, dict(self.named_parameters())
        )
        self.lr, self.gamma, self.normalize, self.loss_name = lr, gamma, normalize, loss
        self.compile_options = compile_options(compile)
        self.compile_forces = compile_forces(compile)
        if self.compile_forces and unsupported_reason() is not None:
            rank_zero_warn(f"matsciml: {unsupported_reason()}; force training runs eagerly")
            self.compile_forces = False
        self.species = None if species is None else sorted(int(z) for z in species)
        self.graph = None if graph is None else graph_record(graph)
        self._check_species()
        self.element_references = check_references(element_references, self.extensive, self.energy_key)
        given = None if element_references == "fit" else element_references
        self.normalizer = EnergyNormalizer(per_atom=self.extensive, element_references=given)
        # the training-mean energy, for the mean-energy baseline metric (eV)
        self.register_buffer("mean_energy", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("fitted", torch.tensor(False))
        if statistics is not None:
            self.fit_normalizer(statistics)
        self.save_hyperparameters(ignore=["model"])
        # a plain-data spec, so a checkpoint rebuilds the model without pickled objects
        self.hparams["model"] = model.spec()
        self.hparams["init_from"] = self.init_from

    # -- normalisation ---------------------------------------------------------------
    def normalizer_settings(self, statistics: Mapping[str, Any]) -> tuple[float, float]:
        """``(shift, scale)`` for this task from the training statistics (after
        :meth:`energy_statistics` has subtracted the normaliser's references)."""
        raise NotImplementedError

    def energy_statistics(self, statistics: Mapping[str, Any], per_atom: bool) -> Mapping[str, float]:
        """Mean and std of the training energies (per atom or total) less the element references."""
        references = self.normalizer.reference_energies()
        if not references:
            return statistics[f"{self.energy_key}_per_atom" if per_atom else self.energy_key]
        return residual_moments(composition_sums(statistics)["per_atom" if per_atom else "total"], references)

    def fit_normalizer(self, statistics: Mapping[str, Any]) -> None:
        """Set the normaliser (and the mean-energy baseline) from training statistics."""
        if self.energy_key not in statistics:
            raise ValueError(f"statistics have no {self.energy_key!r} entry (keys: {sorted(statistics)})")
        self.mean_energy.fill_(float(statistics[self.energy_key]["mean"]))
        if self.element_references == "fit":
            self.normalizer.set_references(fit_references(composition_sums(statistics)))
        if self.normalize:
            shift, scale = self.normalizer_settings(statistics)
            self.normalizer.shift.fill_(shift)
            self.normalizer.scale.fill_(scale)
        self.fitted.fill_(True)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        representation = check_datamodule(self.model, datamodule)
        if stage == "fit" and representation == "graph":
            self._record_graph(datamodule)
        if stage == "fit" and self.species is None and (species := getattr(datamodule, "species", None)):
            self.species = self.hparams["species"] = sorted(int(z) for z in species)  # the calculator refuses others
        if stage == "fit" and self.compile_options is not None and self.trains_forces:
            rank_zero_info(
                "matsciml: training steps compile energy and forces as one graph (compile.forces)"
                if self.compiled_forces() is not None
                else "matsciml: torch.compile does not support double backward: training steps run "
                "the eager model (forces in the loss; compile: {forces: true} compiles them), "
                "validation/test/predict the compiled one"
            )
        if stage == "fit" and not bool(self.fitted):
            statistics = getattr(datamodule, "target_statistics", None)
            if statistics:
                self.fit_normalizer(statistics)
                rank_zero_info(f"matsciml: normaliser from the training statistics: {self.normalizer.extra_repr()}")

    def _record_graph(self, datamodule: Any) -> None:
        """Keep the data's graph settings in the hyper-parameters (so in checkpoints and exports)."""
        data_graph = graph_record({"cutoff": datamodule.cutoff, "max_neighbors": datamodule.max_neighbors})
        if self.graph is not None and self.graph != data_graph:
            raise ValueError(
                f"the task was trained on radius graphs {self.graph} but the data module builds "
                f"{data_graph}; set data.cutoff / data.max_neighbors to match, or start a new task"
            )
        self.graph = data_graph
        self.hparams["graph"] = data_graph

    def _check_species(self) -> None:
        limit = getattr(self.model, "num_species", None)
        if self.species and limit is not None and max(self.species) > limit:
            raise ValueError(
                f"the data holds atomic number {max(self.species)} but "
                f"{type(self.model).__name__} embeds only 1..{limit} (num_species)"
            )

    # -- prediction --------------------------------------------------------------------
    def energy(self, batch: Batch, create_graph: bool = False) -> torch.Tensor:
        """Energies in eV, ``(num_structures,)``.

        ``create_graph``: the caller will differentiate twice (forces in the loss), which
        compiled models cannot; the eager model runs then.
        """
        model = self.model if create_graph else self.compiled_model()
        return self.normalizer.denormalize(model(batch), batch)

    def compiled_model(self) -> torch.nn.Module:
        """The energy model, compiled on first use when ``compile`` is set."""
        if self.compile_options is None:
            return self.model
        # kept out of the module tree: the compiled wrapper shares the model's parameters,
        # and registering it would duplicate them in state_dict and optimiser
        compiled = self.__dict__.get("_compiled_model")
        if compiled is None or compiled._orig_mod is not self.model:
            compiled = torch.compile(self.model, **self.compile_options)
            self.__dict__["_compiled_model"] = compiled
        return compiled

    def compiled_forces(self) -> CompiledForces | None:
        """Compiled energy-and-gradient graphs for force training (``compile: {forces: true}``), or ``None``."""
        if not self.compile_forces:
            return None
        if "_compiled_forces" not in self.__dict__:  # out of the module tree, like the compiled model
            options = {k: v for k, v in self.compile_options.items() if k != "dynamic"}
            self.__dict__["_compiled_forces"] = CompiledForces(options)
        return self.__dict__["_compiled_forces"]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled_model", None)  # rebuilt on first use
        state.pop("_compiled_forces", None)
        return state

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"energy": self.energy(as_batch(batch))}

    def loss_fn(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "huber":
            return torch.nn.functional.huber_loss(prediction, target, delta=self.huber_delta)
        return _LOSSES[self.loss_name](prediction, target)

    @property
    def energy_scale(self) -> torch.Tensor:
        return self.normalizer.scale

    # -- optimisation ------------------------------------------------------------------
    def validation_metrics(self) -> list[str]:
        """The names this task logs in validation (``val/<name>``), for ``monitor``."""
        return ["val/loss", "val/energy_mae", "val/energy_per_atom_mae", "val/energy_mae_baseline"]

    def _check_monitor(self, monitor: str | None) -> str:
        logged = self.validation_metrics()
        if monitor is None:
            return "val/force_mae" if "val/force_mae" in logged else "val/energy_mae"
        if monitor not in logged:
            raise ValueError(f"monitor {monitor!r} is not a metric this task logs; choose one of {logged}")
        return monitor

    def configure_optimizers(self):
        if self.init_from is not None and self.init_report is None:  # after Lightning restored a resumed run
            parent_init.initialise_from_parent(self)
        optimizer = torch.optim.Adam(parent_init.parameter_groups(self), lr=self.lr)
        if self.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=self.plateau_factor, patience=self.plateau_patience
            )
            # stepped after each validation with the monitored value; Lightning says so if it is missing
            lr_scheduler = {"scheduler": plateau, "monitor": self.monitor, "interval": "epoch"}
        else:
            exponential = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.gamma)
            lr_scheduler = {"scheduler": exponential, "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent_init.save_report(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent_init.restore_report(self, checkpoint)

    def configure_callbacks(self) -> list[pl.Callback]:
        ema = [] if self.ema_decay is None else [EMAWeightAveraging(self.ema_decay)]
        return ema + freezing_callbacks(self.freeze_patterns, self.unfreeze_after_epochs)

    # -- steps -------------------------------------------------------------------------
    def step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
        """The loss (normalised units) and metrics ``name: (value in eV units, weight)``."""
        raise NotImplementedError

    def _run(self, batch: Batch, stage: str, group: str | None = None) -> torch.Tensor:
        batch = as_batch(batch)  # DGL / PyG batches (graph_backend) become ours once, here
        loss, metrics = self.step(batch)
        metrics["loss"] = (loss, batch.num_structures)
        if stage == "train":  # baselines are data properties: report them where models are judged
            metrics = {k: v for k, v in metrics.items() if not k.endswith("_baseline")}
        self.log_metrics(stage, metrics)
        if group is not None:  # one of several validation datasets: its own metrics as well
            self.log_metrics(f"{stage}/{group}", metrics)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._run(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._run(batch, "val", validation_group(self._trainer, batch_idx))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._run(batch, "test")

    # -- logging -----------------------------------------------------------------------
    def log_metrics(self, stage: str, metrics: Mapping[str, tuple[torch.Tensor, int]]) -> None:
        """Log ``name: (value, weight)`` as weighted means over all ranks (:func:`~.metric_logging.log_weighted`)."""
        log_weighted(self, stage, metrics)

    def energy_metrics(self, energy: torch.Tensor, target: torch.Tensor, batch: Batch) -> dict:
        error = (energy.detach() - target).abs()
        natoms = batch.natoms.to(error.dtype)
        size = batch.num_structures
        return {
            "energy_mae": (error.mean(), size),
            "energy_per_atom_mae": ((error / natoms).mean(), size),
            "energy_mae_baseline": ((target - self.mean_energy.to(target.dtype)).abs().mean(), size),
        }

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        batch = as_batch(batch)
        out = self.forward(batch)
        result: dict[str, Any] = {"energy": out["energy"].detach()}
        if "forces" in out:
            result["forces"] = list(out["forces"].detach().split(batch.natoms.tolist()))
        for key in ("sid", "fid"):
            if key in batch:
                result[key] = batch[key]
        return result
