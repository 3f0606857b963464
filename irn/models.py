"""Networks built from implicit residual blocks (paper section 3).

``ImplicitResNet`` discretises the hidden ODE ``y' = act(W(t) y + b(t))`` with ``L`` theta-blocks
of step ``h``: ``F_l(y) = act(W_l y + b_l)``. ``ImplicitModel`` wraps it with an input
embedding and a readout, which is all the examples of the paper need.

Ensembles (docs/design.md, section 5): ``ImplicitResNet.stack(nets)`` and ``ImplicitModel.stack(models)``
copy ``E`` networks into one module whose weights carry a leading member dimension
(:class:`StackedPerceptron`, :class:`StackedLinear`) and whose inputs are ``(E, B, ...)``;
``member(e)`` copies member ``e`` back out.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import compiled
from ._checks import choice, integer, keywords, require
from .config import SOLVE_SETTINGS
from .functions import ACTIVATIONS, Perceptron, StackedPerceptron
from .layers import INPUT_CHECKED, ImplicitResidualBlock, check_finite

INITS = ("stationary", "random", "pytorch")

class StackedLinear(nn.Module):
    """``E`` affine maps at once, ``x[e] -> W_e x[e] + b_e`` on ``(E, B, in)``: the stacked
    form of ``nn.Linear`` for embeddings and readouts."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        with torch.no_grad():
            self.weight = nn.Parameter(torch.stack([m.weight for m in linears]).clone())
            self.bias = nn.Parameter(torch.stack([m.bias for m in linears]).clone())

    def member(self, e: int) -> nn.Linear:
        out_features, in_features = self.weight.shape[1:]
        with torch.random.fork_rng(devices=[]):
            linear = nn.Linear(in_features, out_features).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight[e])
            linear.bias.copy_(self.bias[e])
        return linear

    def forward(self, x):
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


def stack_modules(modules: list[nn.Module], name: str) -> nn.Module:
    """One module acting on ``(E, B, ...)`` for ``E`` modules of one kind: ``nn.Linear`` becomes
    a :class:`StackedLinear`; a module without parameters (``PadEmbedding``,
    ``SelectComponent``) is shared, and must be configured alike (``ValueError`` naming
    ``name`` otherwise)."""
    first = modules[0]
    require(all(type(m) is type(first) for m in modules),
            f"{name} differs between the networks: {sorted({type(m).__name__ for m in modules})}")
    if isinstance(first, nn.Linear):
        require(len({tuple(m.weight.shape) for m in modules}) == 1,
                f"{name} differs between the networks: weight shapes "
                f"{sorted({tuple(m.weight.shape) for m in modules})}")
        return StackedLinear(modules)
    require(not any(True for _ in first.parameters()),
            f"{name}: cannot stack a {type(first).__name__} with parameters")
    require(all(vars(m) == vars(first) for m in modules),
            f"{name} differs between the networks")
    return copy.deepcopy(first)


def member_module(module: nn.Module, e: int) -> nn.Module:
    """Member ``e`` of a module made by :func:`stack_modules`."""
    return module.member(e) if isinstance(module, StackedLinear) else copy.deepcopy(module)


def normalized_gaussian(dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``dim x dim`` matrix with N(0, 1) entries divided by its spectral radius ``rho(W)``."""
    w = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return w / torch.linalg.eigvals(w).abs().max()


class ImplicitResNet(nn.Module):
    """``L`` implicit residual blocks ``y_{l+1} = y_l + h((1-theta) F_l(y_l) + theta F_l(y_{l+1}))``
    with ``F_l(y) = act(W_l y + b_l)`` (:class:`irn.functions.Perceptron`).

    Args:
        dim: width of the state ``y`` (inputs ``(B, dim)``; an ensemble's ``(E, B, dim)``).
        num_layers: ``L``, the number of blocks.
        h: step size of every block, > 0.
        theta: implicitness in [0, 1]. The network's default, 0.0, is the explicit ResNet (no
            solve); the block's own default is 0.5 (the trapezoidal rule).
        activation: ``act``, one of ``irn.functions.ACTIVATIONS``.

    ``init="stationary"`` (the paper's): one N(0,1) matrix divided by its spectral radius,
    ``b = 0``, copied into every layer; ``"random"``: an independent such matrix per layer;
    ``"pytorch"``: ``nn.Linear``'s default. Draws from torch's global generator (seed it).
    ``backend``: ``"auto"`` takes the compiled CPU path (:mod:`irn.compiled`) where it
    applies, ``"torch"`` always the generic one, ``"compiled"`` the compiled one or a
    ``ValueError`` naming what it lacks. Further keyword arguments (``solver``, ``backward``,
    ``tol``, ...) go to every block.
    """

    @keywords(*SOLVE_SETTINGS)
    def __init__(self, dim: int, num_layers: int, h: float = 1.0, theta: float = 0.0, *,
                 activation: str = "relu", init: str = "stationary", backend: str = "auto",
                 **block_kwargs):
        super().__init__()
        require(isinstance(dim, int) and dim >= 1, f"dim must be an int >= 1, got {dim!r}")
        require(isinstance(num_layers, int) and num_layers >= 1,
                 f"num_layers must be an int >= 1, got {num_layers!r}")
        choice("activation", activation, ACTIVATIONS)
        choice("init", init, INITS)
        self.dim, self.num_layers = dim, num_layers
        self.blocks = nn.ModuleList(
            ImplicitResidualBlock(Perceptron(dim, activation), h, theta, **block_kwargs)
            for _ in range(num_layers))
        for index, block in enumerate(self.blocks):
            block.name = f"block {index}"
        self.backend = backend
        self._check_backend()
        with torch.no_grad():
            shared = normalized_gaussian(dim) if init == "stationary" else None
            for block in self.blocks:
                if init == "pytorch":
                    continue
                weight = shared if shared is not None else normalized_gaussian(dim)
                block.F.linear.weight.copy_(weight)
                block.F.linear.bias.zero_()

    @classmethod
    def from_blocks(cls, blocks, dim: int, *, backend: str = "auto") -> "ImplicitResNet":
        """A network of one's own blocks: ``blocks`` a sequence of
        :class:`irn.ImplicitResidualBlock` (any residual functions ``F``; renamed ``block 0``,
        ``block 1``, ...), on states of width ``dim``. Ensemble blocks (``h`` or ``theta``
        given per member, ``F`` acting on ``(E, B, dim)``) make an ensemble network. Its
        trajectory, regularisers, statistics and ``with_settings`` are those of a built
        network; the compiled path runs it where its layers are ``Perceptron`` layers."""
        blocks = list(blocks) if isinstance(blocks, (list, tuple, nn.ModuleList)) else None
        require(blocks and all(isinstance(b, ImplicitResidualBlock) for b in blocks),
                "blocks must be a non-empty list of irn.ImplicitResidualBlock")
        integer("dim", dim)
        members = sorted({b.members for b in blocks}, key=str)
        require(len(members) == 1, f"the blocks mix ensembles of different sizes and single "
                                   f"blocks: members {members}")
        return cls._from_blocks(dim, blocks, backend)

    @classmethod
    def _from_blocks(cls, dim: int, blocks: list[ImplicitResidualBlock],
                     backend: str = "auto") -> "ImplicitResNet":
        """A network made of the given blocks (renamed ``block 0``, ``block 1``, ...)."""
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net.dim, net.num_layers = dim, len(blocks)
        net.blocks = nn.ModuleList(blocks)
        for index, block in enumerate(net.blocks):
            block.name = f"block {index}"
        net.backend = backend
        net._check_backend()
        return net

    def _check_backend(self) -> None:
        """``backend`` checked once: a name of ``irn.compiled.BACKENDS``, and for
        ``"compiled"`` a network the compiled path covers (``ValueError`` naming what is
        missing otherwise)."""
        choice("backend", self.backend, compiled.BACKENDS)
        if self.backend == "auto":  # IRN_BACKEND=torch runs a whole program on the generic path
            self.backend = compiled.default_backend()
        if self.backend == "compiled":
            reason = compiled.unsupported(self.blocks)
            require(reason is None, f"backend='compiled' cannot run this network: {reason}")

    def _compiled_states(self, y: torch.Tensor) -> torch.Tensor | None:
        """Every hidden state ``(L + 1, E, B, dim)`` from ``y`` ``(E, B, dim)`` on the compiled
        path, or None where the generic path runs this call (``backend="compiled"``: a
        ``ValueError`` instead)."""
        reason = "backend='torch'" if self.backend == "torch" else compiled.reason(self, y)
        # the path this call runs, for irn.solve_summary (no nn.Module __setattr__ per call)
        self.__dict__["_last_path"] = ("torch", reason) if reason else ("compiled", None)
        if reason is None:
            states = compiled.trajectory(self, y)
            for l, block in enumerate(self.blocks):  # what each block keeps on the generic path
                block.record.solution = states[l + 1] if block.keep_solution else None
            return states
        require(self.backend != "compiled", f"backend='compiled' cannot run this call: {reason}")
        return None

    def _compiled_distances(self, y: torch.Tensor, batch: int):
        """``(D, clean last states)`` of :func:`irn.compiled.trajectory` for ``y`` (``(E, N, dim)``:
        ``batch`` clean samples, then their perturbed copies) on the compiled path, or None
        where this call takes the states instead (the generic path, or kept solutions)."""
        if self.backend == "torch" or any(block.keep_solution for block in self.blocks) \
                or compiled.reason(self, y) is not None:
            return None
        self.__dict__["_last_path"] = ("compiled", None)
        return compiled.trajectory(self, y, batch)

    @keywords("backend", "h", "theta", *SOLVE_SETTINGS)
    def with_settings(self, **block_kwargs) -> "ImplicitResNet":
        """The same network (the same residual functions ``F_l`` and parameters, shared, not
        copied) with other block settings, see :meth:`irn.ImplicitResidualBlock.with_settings`,
        or another ``backend``: e.g. ``net.with_settings(solver="anderson")`` solves a trained
        network with another solver, ``net.with_settings(backend="torch")`` runs it on the
        generic path."""
        backend = block_kwargs.pop("backend", self.backend)
        return self._from_blocks(self.dim, [block.with_settings(**block_kwargs)
                                            for block in self.blocks], backend)

    # -- ensembles ------------------------------------------------------------------------
    @classmethod
    def stack(cls, nets: list["ImplicitResNet"]) -> "ImplicitResNet":
        """``E`` networks as one ensemble (docs/design.md, section 5): inputs ``(E, B, dim)``, member ``e``
        sees only ``y0[e]`` and computes what ``nets[e]`` computes alone. The networks must
        agree in ``dim``, ``num_layers``, activation and every solver setting; ``h`` and
        ``theta`` may differ. The weights are copied (``nets`` and the ensemble stay
        independent)."""
        nets = list(nets)
        require(len(nets) >= 1, "nets must hold at least one network")
        backends = sorted({getattr(n, "backend", None) for n in nets}, key=str)
        require(all(isinstance(n, ImplicitResNet) and n.members is None for n in nets),
                "nets must be single ImplicitResNet networks (not ensembles)")
        first = nets[0]
        for setting in ("dim", "num_layers"):
            values = sorted({getattr(n, setting) for n in nets})
            require(len(values) == 1, f"{setting} differs between the networks: {values}")
        for setting in ("dtype", "device"):
            values = sorted({str(getattr(next(n.parameters()), setting)) for n in nets})
            require(len(values) == 1, f"{setting} differs between the networks: {values}")
        blocks = []
        for layer in zip(*(n.blocks for n in nets)):
            require(all(isinstance(b.F, Perceptron) for b in layer),
                    "only networks of irn.functions.Perceptron layers stack")
            activations = sorted({b.F.activation for b in layer})
            require(len(activations) == 1, f"activation differs between the networks: {activations}")
            for key, value in layer[0].settings.items():
                differing = [b.settings[key] for b in layer if b.settings[key] != value]
                if differing:
                    raise ValueError(f"{key} differs between the networks: {value!r} and "
                                     f"{differing[0]!r}")
            block = ImplicitResidualBlock(StackedPerceptron.stack([b.F for b in layer]),
                                          h=[b.h for b in layer], theta=[b.theta for b in layer],
                                          **layer[0].settings)
            block.keep_iterates = any(b.keep_iterates for b in layer)
            block.keep_solution = any(b.keep_solution for b in layer)
            blocks.append(block)
        require(len(backends) == 1, f"backend differs between the networks: {backends}")
        return cls._from_blocks(first.dim, blocks, first.backend)

    @property
    def members(self) -> int | None:
        """The number of members ``E`` of an ensemble (None for a single network)."""
        return self.blocks[0].members

    def member(self, e: int) -> "ImplicitResNet":
        """A standalone copy of member ``e`` of an ensemble: its weights and settings."""
        members = self.members
        require(members is not None, "member() needs an ensemble (ImplicitResNet.stack)")
        require(isinstance(e, int) and 0 <= e < members,
                f"e must be an int in [0, {members - 1}], got {e!r}")
        blocks = []
        for block in self.blocks:
            single = ImplicitResidualBlock(block.F.member(e), block.h[e], block.theta[e],
                                           **block.settings)
            single.keep_iterates, single.keep_solution = block.keep_iterates, block.keep_solution
            blocks.append(single)
        return self._from_blocks(self.dim, blocks, self.backend)

    @property
    def keep_iterates(self) -> bool:
        """Whether the blocks record their iterates (for ``irn.regularizers.fixed_point``)."""
        return all(block.keep_iterates for block in self.blocks)

    @keep_iterates.setter
    def keep_iterates(self, value: bool) -> None:
        for block in self.blocks:
            block.keep_iterates = bool(value)

    @property
    def keep_solution(self) -> bool:
        """Whether the blocks keep their latest outputs (for ``irn.regularizers.jacobian``)."""
        return all(block.keep_solution for block in self.blocks)

    @keep_solution.setter
    def keep_solution(self, value: bool) -> None:
        for block in self.blocks:
            block.keep_solution = bool(value)

    def _renamed(self, value=None):
        raise AttributeError("ImplicitResNet.keep_solutions is spelled keep_solution, as on the "
                             "blocks (set net.keep_solution = True)")

    keep_solutions = property(_renamed, _renamed)  # the old spelling fails loudly, not silently

    def _check_input(self, y0):
        members = self.members
        if members is None:
            if not (y0.dim() == 2 and y0.shape[1] == self.dim):  # (no message built per call)
                raise ValueError(f"y0 must have shape (batch, {self.dim}), got {tuple(y0.shape)}")
        elif not (y0.dim() == 3 and y0.shape[0] == members and y0.shape[2] == self.dim):
            raise ValueError(f"y0 must have shape (members={members}, batch, {self.dim}) for an "
                             f"ensemble, got {tuple(y0.shape)}")
        check_finite("y0", y0, members is not None)  # once per call, on every path

    def _run(self, y0: torch.Tensor, every: bool) -> torch.Tensor:
        """The network on ``y0`` in the public layout: its last state, or with ``every`` all
        ``L + 1`` states stacked. The compiled path takes the member layout (one network is
        one member); the generic one calls the blocks (so that their hooks run)."""
        one = self.members is None  # the public layout's boundary
        states = self._compiled_states(y0.unsqueeze(0) if one else y0)
        if states is not None:
            states = states[:, 0] if one else states
            return states if every else states[-1]
        kept = [y0]
        token = INPUT_CHECKED.set(True)  # the blocks need not check it again
        try:
            for block in self.blocks:
                y0 = block(y0)
                if every:
                    kept.append(y0)
        finally:
            INPUT_CHECKED.reset(token)
        return torch.stack(kept) if every else y0

    def states(self, y: torch.Tensor) -> torch.Tensor:
        """Every hidden state ``(L + 1, E, B, dim)`` from ``y`` of shape ``(E, B, dim)``: the
        trajectory in the member layout, for one network too (``E = 1``)."""
        count = self.members or 1
        if not (y.dim() == 3 and y.shape[0] == count and y.shape[2] == self.dim):
            raise ValueError(f"y must have shape (members={count}, batch, {self.dim}), got "
                             f"{tuple(y.shape)}")
        check_finite("y", y, True)
        return self._run(y, every=True) if self.members else self._run(y[0], every=True)[:, None]

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        """The last state ``y_L`` from ``y0`` (``(B, dim)``; an ensemble's ``(E, B, dim)``)."""
        self._check_input(y0)
        return self._run(y0, every=False)

    def trajectory(self, y0: torch.Tensor) -> torch.Tensor:
        """All hidden states ``(y_0, y_1, ..., y_L)`` stacked: shape ``(L + 1, B, dim)``
        (``(L + 1, E, B, dim)`` for an ensemble)."""
        self._check_input(y0)
        return self._run(y0, every=True)


class PadEmbedding(nn.Module):
    """``x -> (x, 0, ..., 0)``: embeds ``(B, k)`` inputs into the ``dim``-dimensional state."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        require(dim >= in_features, f"dim must be >= in_features ({in_features}), got {dim}")
        self.in_features, self.dim = in_features, dim

    def forward(self, x):
        return nn.functional.pad(x, (0, self.dim - self.in_features))


class SelectComponent(nn.Module):
    """Readout ``y -> y[..., index:index+1]`` (the paper's Example 1 reads the 2nd component)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, y):
        return y[..., self.index:self.index + 1]


class ImplicitModel(nn.Module):
    """``readout(net(embed(x)))``: an input embedding, an :class:`ImplicitResNet`, a readout."""

    def __init__(self, embed: nn.Module, net: ImplicitResNet, readout: nn.Module):
        super().__init__()
        self.embed, self.net, self.readout = embed, net, readout

    def forward(self, x):
        """``readout(net(embed(x)))``."""
        return self.readout(self.net(self.embed(x)))

    def trajectory(self, x):
        """Hidden states of the network for inputs ``x``: ``(L + 1, B, dim)``."""
        return self.net.trajectory(self.embed(x))

    @classmethod
    def stack(cls, models: list["ImplicitModel"]) -> "ImplicitModel":
        """``E`` models as one ensemble (embedding, network and readout stacked, weights
        copied): inputs ``(E, B, ...)``, outputs ``(E, B, ...)``; see
        :meth:`ImplicitResNet.stack`."""
        models = list(models)
        require(len(models) >= 1, "models must hold at least one model")
        return cls(stack_modules([m.embed for m in models], "embed"),
                   ImplicitResNet.stack([m.net for m in models]),
                   stack_modules([m.readout for m in models], "readout"))

    @property
    def members(self) -> int | None:
        """``E`` for an ensemble, None for a single model."""
        return self.net.members

    def member(self, e: int) -> "ImplicitModel":
        """A standalone copy of member ``e`` of an ensemble."""
        net = self.net.member(e)
        return ImplicitModel(member_module(self.embed, e), net, member_module(self.readout, e))
