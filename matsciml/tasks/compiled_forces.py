"""Force training under ``torch.compile``: energies and forces traced as one first-order graph.

A force loss differentiates the energy twice: forces are ``-dE/dx`` with ``create_graph=True``,
then the loss backward reaches the weights through them. ``torch.compile`` refuses that
("aot_autograd does not currently support double backward"). Here the function

    (batch tensors, parameters, buffers) -> (raw energies (B,), d(sum raw)/dpositions (N, 3))

is traced by ``make_fx`` in symbolic mode with the ``torch.autograd.grad`` call inside it, so the
inner backward is expanded into ordinary aten ops. The traced graph is a plain function of its
inputs; ``torch.compile`` compiles it (inductor by default), and the training backward through it
is a first-order backward, which AOTAutograd derives like any other.

Shapes: the atom, edge and structure counts are symbols in the traced graph. Tracing records
the guards the model's code put on them (at least ``size != 0, 1``); a batch whose sizes satisfy
a graph's guards reuses it, one that does not (a single-structure batch, say) is traced and
compiled again. So nothing is padded: padding to buckets would spend compute on dummy atoms and
need every model to mask them, while symbolic shapes already give one graph for all usual sizes.

Needs torch >= 2.6 (symbolic ``make_fx`` through ``autograd.grad`` and a guard list on its shape
environment); on older torch :func:`unsupported_reason` says so and the task trains eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from matsciml.data import keys as K
from matsciml.data.batch import Batch
from matsciml.models import base as model_base

#: The oldest torch on which this path was built to run (nequip 0.19 documents the same floor).
MIN_TORCH = (2, 6)

#: Graphs traced per model and setting before batches that fit none run eagerly (as Dynamo's
#: recompile limit): sizes that break guards every time would otherwise compile every batch.
MAX_GRAPHS = 8

#: Batch fields the energy must not see: labels and identifiers (and sizes of no use to a graph).
LABELS = frozenset(
    {K.ENERGY, K.FORCES, K.STRESS, K.INITIAL_ENERGY, K.RELAXED_ENERGY, K.RELAXED_POSITIONS, K.SID, K.FID}
)


def unsupported_reason() -> str | None:
    """Why this torch cannot compile force training (``None``: it can)."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        return f"compiling force training needs torch >= {'.'.join(map(str, MIN_TORCH))}, this is {torch.__version__}"
    return None


def _silu_backward(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # aten's silu_backward has no derivative of its own, and the default decomposition writes the
    # sigmoid as 1 / (1 + exp(-x)), whose derivative is inf / inf = NaN once exp(-x) overflows
    sigmoid = torch.sigmoid(x)
    return grad_output * sigmoid * (1 + x * (1 - sigmoid))


def _decompositions() -> dict:
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    table[torch.ops.aten.silu_backward.default] = _silu_backward
    return table


@contextlib.contextmanager
def _distinct_size_symbols() -> Iterator[None]:
    """Give every input dimension its own symbol while tracing (make_fx's and torch.compile's).

    By default equal sizes share a symbol ("duck shaping"): a batch of 8 structures would tie the
    structure count to any weight of width 8, and the graph would hold only for batches of 8.
    """
    config = torch.fx.experimental._config
    before = config.use_duck_shape
    config.use_duck_shape = False
    try:
        yield
    finally:
        config.use_duck_shape = before


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    # only the switch: torch.backends.mkldnn.flags() would also set (and warn about) TF32
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


class _Graph:
    """One traced-and-compiled graph and the shape guards under which it is valid."""

    def __init__(self, traced: torch.fx.GraphModule, options: Mapping[str, Any]):
        import sympy
        from torch._guards import detect_fake_mode

        placeholders = [node.meta["val"] for node in traced.graph.nodes if node.op == "placeholder"]
        shape_env = detect_fake_mode(placeholders).shape_env
        # each input dimension: a sympy expression in the graph's size symbols (or an integer)
        self.dims = [[s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in v.shape] for v in placeholders]
        # guards in the symbols the inputs carry (the trace replaced some symbols by sizes or others)
        guards = [guard.expr.xreplace(shape_env.replacements) for guard in shape_env.guards]
        self.guards = [guard for guard in guards if guard is not sympy.true]
        self.compiled = torch.compile(traced, **{"dynamic": True, **options})

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _distinct_size_symbols():  # torch.compile traces the graph again on its first call
            return self.compiled(*tensors)

    def accepts(self, inputs: list[torch.Tensor]) -> bool:
        """Whether ``inputs``' sizes satisfy every guard recorded while tracing."""
        import sympy

        values: dict = {}
        derived = []  # sizes the trace wrote as expressions of others (ptr: num_structures + 1)
        for dims, tensor in zip(self.dims, inputs, strict=True):
            if len(dims) != tensor.dim():
                return False
            for expr, size in zip(dims, tensor.shape, strict=True):
                if isinstance(expr, sympy.Symbol):
                    if size < 2:  # the trace took every symbol for >= 2 (sizes 0 and 1 are traced as constants)
                        return False
                    values[expr] = size
                else:
                    derived.append((expr, size))
        if any(sympy.sympify(expr).xreplace(values) != size for expr, size in derived):
            return False
        # a guard still symbolic after substitution names a size this check cannot see: retrace
        return all(guard.xreplace(values) is sympy.true for guard in self.guards)


def _eager(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """What a graph computes, without one."""
    positions = batch.positions.detach().requires_grad_(True)
    raw = model(batch.replace(positions=positions))
    (gradient,) = torch.autograd.grad(raw.sum(), positions, create_graph=True)
    return raw, gradient


class CompiledForces:
    """Raw energies and their gradient with respect to positions, from compiled graphs.

    Called as ``raw, gradient = compiled_forces(model, batch)``; ``gradient`` keeps its graph, so a
    loss on it trains the model's parameters. Dropout and other training-mode behaviour is traced
    as the model is set (the mode is part of the cache key).

    Args:
        options: ``torch.compile`` keyword arguments for the traced graphs (``backend``, ``mode``).

    Shapes:
        returns ``(num_structures,)`` and ``(num_atoms, 3)`` in the positions' dtype.
    """

    def __init__(self, options: Mapping[str, Any] | None = None):
        self.options = dict(options or {})
        self.graphs: dict[tuple, list[_Graph]] = {}

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        fields = sorted(name for name, value in batch.items() if torch.is_tensor(value) and name not in LABELS)
        names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
        state = [value for _, value in model.named_parameters()] + [value for _, value in model.named_buffers()]
        inputs = [batch[name] for name in fields]
        key = (
            id(model),
            model.training,
            tuple(fields),
            tuple(names),
            tuple((t.dtype, t.device) for t in inputs),
            tuple((t.dtype, t.device, t.requires_grad) for t in state),
        )
        if hasattr(model, "num_species") and hasattr(model, "check_species"):  # skipped in the trace (reads a value)
            model.check_species(batch.atomic_numbers)
        graphs = self.graphs.setdefault(key, [])
        graph = next((g for g in graphs if g.accepts(inputs + state)), None)
        if graph is None and len(graphs) >= MAX_GRAPHS:
            if not self.__dict__.get("_said_too_many"):
                self._said_too_many = True
                warnings.warn(
                    f"matsciml: {MAX_GRAPHS} force graphs traced and this batch fits none of them; "
                    "batches that fit none are computed eagerly from now on",
                    stacklevel=2,
                )
            return _eager(model, batch)
        if graph is None:
            graph = _Graph(self._trace(model, fields, names, inputs + state), self.options)
            graphs.append(graph)
        return graph(*inputs, *state)

    @staticmethod
    def _trace(model: torch.nn.Module, fields: list[str], names: list[str], inputs: list[torch.Tensor]):
        from torch.fx.experimental.proxy_tensor import make_fx

        def energy_and_gradient(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            batch = Batch(dict(zip(fields, tensors[: len(fields)], strict=True)))
            state = dict(zip(names, tensors[len(fields) :], strict=True))
            positions = batch.positions.detach().requires_grad_(True)
            raw = torch.func.functional_call(model, state, (batch.replace(positions=positions),))
            (gradient,) = torch.autograd.grad(raw.sum(), positions, create_graph=True)
            return raw, gradient

        # oneDNN off: on CPU in float32 an LSTM (MegNet's set2set) would be traced as one
        # mkldnn_rnn_layer op, whose outputs inductor's generated code rejects; without it the LSTM
        # is decomposed into matrix products and activations like the rest of the graph
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        try:
            with _distinct_size_symbols(), _without_onednn(), model_base.tracing(), torch.enable_grad():
                return make_fx(
                    energy_and_gradient,
                    decomposition_table=_decompositions(),
                    tracing_mode="symbolic",
                    _allow_non_fake_inputs=True,
                    _error_on_data_dependent_ops=True,
                )(*inputs)
        except GuardOnDataDependentSymNode as error:
            first_line = str(error).splitlines()[0]
            raise RuntimeError(
                f"compile: {{forces: true}} cannot trace {type(model).__name__}: its energy reads a tensor's "
                f"value back to Python (int(), .item(), a size that depends on values: {first_line}); compute "
                "that outside the energy, or leave forces out of compile"
            ) from error
