"""The compiled CPU path of :class:`irn.ImplicitResNet` (docs/design.md, section 9).

The paper's networks are tiny (width 2 to 32), so on the generic path a training step is
mostly the cost of calling PyTorch once per solver iteration and layer. Here a network of
:class:`irn.functions.Perceptron` layers (``F_l(y) = act(W_l y + b_l)``) and its stacked
ensembles run forward in one compiled call (fixed-point or Anderson iteration, every layer,
every member) and backward in another (``neumann`` or ``direct``), wrapped in one
``autograd.Function`` that returns every hidden state, so ``net(y0)`` and
``net.trajectory(y0)`` use it; for the perturbation regulariser it returns the distances of
the perturbed copies instead (:func:`trajectory` with ``batch``). It computes what the
generic path computes: outputs, gradients, the blocks' ``last_stats`` per layer and member,
the same warnings and errors (tested to 1e-10 relative in float64).

``ImplicitResNet(backend=...)``: ``"auto"`` (default) takes this path where it applies and was
measured faster (:func:`compiled_widest`: width, per-member batch, members and dtype against
the crossover that ``make bench`` measures, committed as ``irn/auto_crossover.json``) and the
generic one elsewhere, ``"torch"`` always the generic one, ``"compiled"`` this one or a
``ValueError`` naming what is missing. It applies to networks whose layers are all
``Perceptron`` (or stacked) with ``solver`` ``"fixed_point"`` or ``"anderson"`` and
``backward`` ``"neumann"`` or ``"direct"``, on CPU float32/float64 tensors, when numba is
installed (the ``compiled`` extra; ``import irn`` never needs it); blocks that keep their
iterates (``irn.regularizers.fixed_point``) get them, with the regulariser's gradient through
them, for ``fixed_point``. It does not apply (the generic path runs) under ``torch.func``
transforms, on an empty batch, and under ``torch.autocast``. A second derivative (``create_graph=True``) through a
compiled forward is computed by the generic path, which re-solves the forward for it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import operator
import os
import threading
from pathlib import Path

import numpy as np
import torch

from ._checks import require
from .functions import Perceptron, StackedPerceptron
from .solvers import Anderson
from .driver import SolveInfo
from .errors import SolverError

K = None  # irn._kernels once loaded: numba is imported at the first network that asks


def kernels():
    """The compiled kernels (:mod:`irn._kernels`), or None when numba is not installed (the
    ``compiled`` extra); loaded at the first call, so that ``import irn`` needs only torch and
    numpy."""
    global K
    if K is None:
        try:
            from . import _kernels
        except ImportError:
            return None
        K = _kernels
    return K

BACKENDS = ("auto", "torch", "compiled")
COVERED_SOLVERS = ("fixed_point", "anderson")
COVERED_BACKWARDS = ("neumann", "direct")
DTYPES = (torch.float32, torch.float64)
#: where ``backend="auto"`` compiles: per dtype, member count and per-member batch, the
#: largest width up to which the compiled training step measured faster than the generic one
#: (``benchmarks/crossover.py``, run by ``make bench``, writes it; the table beside it is
#: ``benchmarks/results_crossover.md``); read at the first call that needs it
CROSSOVER_FILE = Path(__file__).with_name("auto_crossover.json")
_PARALLEL = threading.Lock()  # one parallel kernel at a time per process
_KEEPS, _REQUIRES_GRAD = operator.attrgetter("keep_iterates"), operator.attrgetter("requires_grad")


def default_backend() -> str:
    """What ``backend="auto"`` means: ``auto``, unless the environment variable
    ``IRN_BACKEND`` names another backend (``IRN_BACKEND=torch`` runs every network of a
    program on the generic path, to compare the two)."""
    value = os.environ.get("IRN_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"IRN_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def unsupported(blocks) -> str | None:
    """Why a network of ``blocks`` cannot take the compiled path, whatever its input (None:
    it can)."""
    if kernels() is None:
        return "numba is not installed (pip install -e '.[compiled]'; make installs it)"
    for block in blocks:
        if not isinstance(block.F, (Perceptron, StackedPerceptron)):
            return (f"{block.name}: F is a {type(block.F).__name__}, the compiled path covers "
                    f"irn.functions.Perceptron layers")
        if block.solver not in COVERED_SOLVERS:
            what = ("a fallback tuple of solvers" if isinstance(block.solver, tuple)
                    else f"solver={block.solver!r}")
            return (f"{block.name}: {what} runs on the generic path; the compiled path covers "
                    f"one of the solvers {COVERED_SOLVERS}")
        if block.backward not in COVERED_BACKWARDS:
            return (f"{block.name}: backward={block.backward!r}, the compiled path covers "
                    f"{COVERED_BACKWARDS}")
    activations = {block.F.activation for block in blocks}
    if len(activations) > 1:
        return f"the layers' activations differ ({sorted(activations)})"
    (activation,) = activations
    if activation not in K.ACTIVATION_CODES:
        return (f"activation {activation!r} has no compiled kernel (the compiled path covers "
                f"{tuple(K.ACTIVATION_CODES)})")
    return None


def reason(net, y0: torch.Tensor | None = None) -> str | None:
    """Why ``net`` (called on ``y0``, when given) runs on the generic path; None when it takes
    the compiled one."""
    if net.backend == "torch":
        return "backend='torch'"
    p = plan(net)
    why = p.unsupported or (None if y0 is None else not_applicable(net, y0))
    if why is not None or net.backend != "auto":
        return why
    members = p.members  # one network is one member
    dtype = p.parameters()[0].dtype if y0 is None else y0.dtype
    if str(dtype).removeprefix("torch.") not in crossover()["largest_width"]:
        return f"no crossover measured for {dtype} (irn/auto_crossover.json): backend='auto'"
    if y0 is None:  # any call: compiled at some measured batch
        batches = crossover()["largest_width"][str(dtype).removeprefix("torch.")]["1"]
        return None if any(net.dim <= compiled_widest(members, int(batch), dtype)
                           for batch in batches) else \
            f"width {net.dim}: the generic path measured faster at every measured batch"
    batch = y0.shape[-2]
    if net.dim <= compiled_widest(members, batch, dtype):
        return None
    return (f"width {net.dim}, batch {batch} per member, {members} member(s), {dtype}: the "
            f"generic path measured faster (backend='auto', irn/auto_crossover.json)")


@functools.cache
def crossover() -> dict:
    """The measured crossover (:data:`CROSSOVER_FILE`), read once."""
    return json.loads(CROSSOVER_FILE.read_text())


@functools.lru_cache(maxsize=1024)
def compiled_widest(members: int, batch: int, dtype: torch.dtype) -> int:
    """``backend="auto"``'s rule: the widest network it compiles for ``members`` members of
    ``batch`` samples each in ``dtype``, read from :data:`CROSSOVER` at the measured member
    count and batch nearest on a log scale (0: none)."""
    table = crossover()["largest_width"].get(str(dtype).removeprefix("torch."))
    if table is None:
        return 0

    def nearest(keys, value):
        return min(keys, key=lambda key: abs(math.log(int(key)) - math.log(max(value, 1))))
    by_batch = table[nearest(table, members)]
    return by_batch[nearest(by_batch, batch)]


def not_applicable(net, y0: torch.Tensor) -> str | None:
    """Why this call of ``net`` on ``y0`` cannot take the compiled path, whatever the network
    (None: it can)."""
    if y0.device.type != "cpu":
        return f"the input is on {y0.device} (the compiled path is CPU only)"
    weight = plan(net).parameters()[0]
    if y0.dtype not in DTYPES or weight.dtype != y0.dtype:
        return (f"dtypes {y0.dtype} (input) and {weight.dtype} (weights): the compiled path "
                f"needs both float32 or both float64")
    if any(map(_KEEPS, net.blocks)) and any(b.keep_iterates and b.solver != "fixed_point"
                                            for b in net.blocks):
        return "keep_iterates with solver 'anderson' (R_fp through its steps: the generic path)"
    if torch._C._are_functorch_transforms_active():
        return "a torch.func transform is active"
    if y0.numel() == 0:
        return "the batch is empty"
    if torch.is_autocast_enabled("cpu"):
        return "torch.autocast is active"
    return None


class Plan:
    """What the kernels need of a network that does not change between calls: activation,
    per-layer stopping rules and backward, per-layer and per-member coefficients; rebuilt only
    when the blocks change."""

    def __init__(self, blocks):
        self.blocks = list(blocks)
        self.key = _key(self.blocks)
        self.unsupported = unsupported(self.blocks)
        if self.unsupported is not None:
            return
        first = self.blocks[0]
        self.members = E = len(first.thetas)  # one network is one member
        self.kind = K.ACTIVATION_CODES[first.F.activation]
        self._stopping = {}  # per dtype: the layers' stopping rules, :meth:`stopping`
        self.max_iters = np.array([b.max_iters for b in blocks], dtype=np.int64)
        self.lin_max_iters = np.array([b.lin_max_iters for b in blocks], dtype=np.int64)
        self.method = np.array([K.NEUMANN if b.backward == "neumann" else K.DIRECT
                                for b in blocks], dtype=np.int64)
        self.solver = np.array([K.ANDERSON if b.solver == "anderson" else K.FIXED_POINT
                                for b in blocks], dtype=np.int64)
        anderson = [Anderson.__init__.__kwdefaults__ | b.config.solver_options
                    if b.solver == "anderson" else {"memory": 1, "regularization": 0.0}
                    for b in blocks]
        # a window never holds more than the iterations done (a larger memory needs no room)
        self.memory = np.array([min(o["memory"], b.max_iters) for o, b in zip(anderson, blocks)],
                               dtype=np.int64)
        self.regularization = np.array([o["regularization"] for o in anderson], dtype=np.float64)
        h = np.array([np.broadcast_to(b.h, E) for b in blocks], dtype=np.float64)
        theta = np.array([np.broadcast_to(b.theta, E) for b in blocks], dtype=np.float64)
        self.implicit = theta > 0
        # the forward solver each layer's members report (None: an explicit member)
        self.solver_names = [[b.solver if solves else None for solves in row]
                             for b, row in zip(blocks, self.implicit.tolist())]
        # h(1-theta) and h theta as the generic path rounds them (a double, then the dtype)
        self._coefficients = {np.dtype(np.float64): (h * (1 - theta), h * theta)}
        self.solving = self.implicit.any(axis=1)  # layers with a solve (a report)
        for block, implicit in zip(self.blocks, self.implicit):  # who solves, for the records
            block.record.solving = [e for e, solves in enumerate(implicit) if solves]
        # where each layer's weight and bias live (read there at every call, so a replaced
        # parameter is seen; nn.Module's attribute lookup would cost more than the kernels)
        owners = [b.F.linear if isinstance(b.F, Perceptron) else b.F for b in self.blocks]
        self._owners = [owner._parameters for owner in owners]

    def stopping(self, dtype: torch.dtype):
        """The layers' stopping rules in ``dtype`` (:meth:`irn.SolveConfig.stopping`) as arrays
        ``(atol, rtol, lin_atol, lin_rtol, eps)``, each ``(L,)``, made once per dtype."""
        if dtype not in self._stopping:
            rules = [b.config.stopping(dtype, None, b.name) for b in self.blocks]
            self._stopping[dtype] = tuple(np.array([getattr(r, name) for r in rules])
                                          for name in ("atol", "rtol", "lin_atol", "lin_rtol",
                                                       "eps"))
        return self._stopping[dtype]

    def coefficients(self, dtype):
        dtype = np.dtype(dtype)
        if dtype not in self._coefficients:
            c_exp, c_imp = self._coefficients[np.dtype(np.float64)]
            self._coefficients[dtype] = (c_exp.astype(dtype), c_imp.astype(dtype))
        return self._coefficients[dtype]

    def parameters(self) -> list[torch.Tensor]:
        """``[W_0, b_0, W_1, b_1, ...]``, the tensors the gradients go to."""
        params = []
        for owned in self._owners:
            params += (owned["weight"], owned["bias"])
        return params


def _key(blocks):
    """What a plan depends on: the blocks, their residual functions, settings and steps ``h``
    and ``theta`` (read from the instances' dicts: ``nn.Module`` attribute lookup costs more
    than the kernels)."""
    return tuple((b, b._modules["F"], b.__dict__["_config"], b.__dict__["h"], b.__dict__["theta"])
                 for b in blocks)


def plan(net) -> Plan:
    """The network's :class:`Plan`, cached on it (rebuilt when a block, its ``F`` or its
    settings change)."""
    cached = net.__dict__.get("_compiled_plan")
    # tuples compare in C (each entry by identity, then ==: the same blocks and F, equal
    # settings and steps)
    if cached is None or cached.key != _key(net.blocks):
        cached = Plan(net.blocks)
        net._compiled_plan = cached
    return cached


class FlatParameters:
    """A network's layer weights and biases in one storage, for a training loop (see
    :func:`flat_parameters`): ``data``, a leaf tensor that requires grad, holds
    ``[W_0, ..., W_{L-1}, b_0, ..., b_{L-1}]`` (each ``W_l`` ``(E, d, d)``, each ``b_l``
    ``(E, d)``), and every layer's ``Parameter`` is a view of it; ``grad`` is ``data.grad``,
    and every layer's ``.grad`` is a view of it. A compiled call then hands autograd one
    tensor and takes one gradient back, and an optimiser steps one tensor, where they took
    ``2L`` (a gradient accumulation and an optimiser tensor each: about 7 us apiece, more
    than the kernels of a small network). The values, and so every number, are unchanged."""

    def __init__(self, net):
        reason = flat_unsupported(net)
        require(reason is None, f"flat parameters: {reason}")
        params = plan(net).parameters()
        self.params = params[0::2] + params[1::2]  # the weights, then the biases
        with torch.no_grad():
            data = torch.cat([t.reshape(-1) for t in self.params])
        self.data, self.grad = data.requires_grad_(), torch.zeros_like(data)
        self.split = sum(t.numel() for t in params[0::2])  # where the biases start
        offset, storage, self.views = 0, data.detach(), []
        for t in self.params:
            n = t.numel()
            t.data = storage[offset:offset + n].view_as(t)
            self.views.append(self.grad[offset:offset + n].view_as(t))
            offset += n
        self.pointers = [t.data_ptr() for t in self.params]
        self.reset()

    def reset(self) -> None:
        """Zero the gradients in place: ``data.grad`` is ``grad`` and every layer's ``.grad``
        its view again (whatever set them to None or replaced them since)."""
        self.data.grad = self.grad
        for t, view in zip(self.params, self.views):
            if t.grad is not view:
                t.grad = view
        self.grad.zero_()

    def release(self) -> None:
        """Give every layer parameter and gradient its own storage again (their values kept)."""
        with torch.no_grad():
            for t in self.params:
                t.data = t.data.clone()
                if t.grad is not None:
                    t.grad = t.grad.clone()

    def serves(self, params) -> bool:
        """Whether these are still the network's parameters (``plan(net).parameters()``), in
        this storage."""
        ordered = params[0::2] + params[1::2]
        return (len(ordered) == len(self.params) and all(map(operator.is_, ordered, self.params))
                and [t.data_ptr() for t in ordered] == self.pointers)

    def arrays(self, L: int, E: int, d: int, flat=None):
        """``(W, bias)`` as numpy views ``(L, E, d, d)`` and ``(L, E, d)`` of ``flat`` (the
        parameters by default, or a gradient of their layout)."""
        flat = self.data.detach().numpy() if flat is None else flat
        return flat[:self.split].reshape(L, E, d, d), flat[self.split:].reshape(L, E, d)


@contextlib.contextmanager
def flat_parameters(net):
    """Within this context the network's compiled calls take and give its layer parameters as
    one tensor (a :class:`FlatParameters`, yielded): a training loop steps ``flat.data`` with
    its optimiser (instead of the layers' parameters) and zeroes the gradients with
    ``flat.reset()`` (instead of setting them to None). The layers' values and gradients are
    what they would be without it, on either path (a generic call accumulates into the same
    gradient views); moving or replacing the network's parameters inside the context is a
    ``RuntimeError`` at the next call. On exit every parameter gets its own storage again.
    See :func:`flat_unsupported` for the networks it takes."""
    require("_flat_parameters" not in net.__dict__, "flat_parameters is already active on this network")
    flat = FlatParameters(net)
    net._flat_parameters = flat
    try:
        yield flat
    finally:
        net.__dict__.pop("_flat_parameters", None)
        flat.release()


def flat_unsupported(net) -> str | None:
    """Why ``net``'s layers cannot train as one tensor (None: they can): the compiled path must
    cover the network, every layer parameter must require grad (a frozen one would be
    stepped) and none may be shared between layers (a tied weight would be laid out twice)."""
    p = plan(net)
    if p.unsupported is not None:
        return p.unsupported
    params = p.parameters()
    if not all(t.requires_grad for t in params):
        return "a layer parameter does not require grad"
    if len({id(t) for t in params}) != len(params):
        return "layers share a parameter"
    return None


def trajectory(net, y0: torch.Tensor, batch: int | None = None):
    """Every hidden state ``(L + 1, E, B, d)`` of ``net`` (an ensemble, or one network with
    ``E = 1``) from ``y0`` ``(E, B, d)``, differentiable when grad mode is on. Blocks with
    ``keep_iterates`` get the batch means of their iterates' residual norms
    (``record.iterate_means``, differentiable too: the fixed-point regulariser).

    With ``batch``, ``y0`` holds ``B = batch`` clean samples followed by ``S`` perturbed copies
    of them, and the result is ``(D, clean)`` instead: the distances
    ``D[l, e, s, b] = ||y~_l^{s,b} - y_l^b||`` ``(L + 1, E, S, B)`` and the clean samples' last
    states ``(E, B, d)`` (``irn.regularizers.perturbation_distances``, without the states of
    every copy passing through autograd)."""
    p = plan(net)
    params = p.parameters()
    keep = any(map(_KEEPS, p.blocks))
    flat = net.__dict__.get("_flat_parameters")
    if flat is not None and not flat.serves(params):  # the optimiser would step a stale copy
        raise RuntimeError("the network's layer parameters were moved or replaced inside "
                           "irn.compiled.flat_parameters; leave the context first")
    if torch.is_grad_enabled() and (y0.requires_grad or any(map(_REQUIRES_GRAD, params))):
        inputs = params if flat is None else (flat.data,)
        first, clean, means = _Network.apply(p, keep, flat, batch, y0, *inputs)
    else:
        with torch.no_grad():
            Y, saved = _forward(p, y0, params, keep, flat)
            (first, clean), means = _outputs(Y, batch), torch.from_numpy(saved[-1])
    if keep:
        _keep_means(p, means)
    return first if batch is None else (first, clean)


def _outputs(Y, batch):
    """``(states, None)`` from the kernels' states, or with ``batch`` the distances and the
    clean samples' last states (:func:`trajectory`)."""
    if batch is None:
        return _states(Y), None
    L1, E, d, N = Y.shape
    D = np.empty((L1, E, N // batch - 1, batch), Y.dtype)
    K.distances(Y, batch, D)
    clean = np.ascontiguousarray(Y[-1, :, :, :batch].transpose(0, 2, 1))
    return torch.from_numpy(D), torch.from_numpy(clean)


def _keep_means(p: Plan, means: torch.Tensor) -> None:
    """Each keeping block's ``iterate_means`` ``(K_l, E)``: rows of ``means`` ``(L, K, E)`` up
    to its members' largest iteration count (``K_l``, as long as the generic path's record)."""
    for l, block in enumerate(p.blocks):
        if block.keep_iterates:
            block.record.iterate_means = means[l, :max(s.iterations for s in block.record.stats)]


def _states(Y) -> torch.Tensor:
    """The kernels' states ``(L + 1, E, d, B)`` as PyTorch's ``(L + 1, E, B, d)`` (contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(Y.transpose(0, 1, 3, 2)))


def _kernel(name: str, members: int):
    """The serial or parallel kernel: threads only for several members and when torch may use
    more than one (a training task runs with one, see irn.paper.parallel)."""
    parallel = members > 1 and torch.get_num_threads() > 1
    return getattr(K, f"{name}_{'parallel' if parallel else 'serial'}"), parallel


def _run(name, members, *arrays):
    kernel, parallel = _kernel(name, members)
    if not parallel:
        return kernel(*arrays)
    import numba

    with _PARALLEL:  # numba's thread count is set for this call and restored
        previous = numba.get_num_threads()
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        try:
            return kernel(*arrays)
        finally:
            numba.set_num_threads(previous)


def _weights(p: Plan, params, flat, d: int):
    """The layers' ``(W, bias)`` as numpy arrays ``(L, E, d, d)`` and ``(L, E, d)``."""
    L, E = len(p.blocks), p.members
    if flat is not None:  # a copy: an in-place edit of a layer before the backward must not reach it
        W, bias = flat.arrays(L, E, d)
        return W.copy(), bias
    with torch.no_grad():
        return (torch.stack(params[0::2]).numpy().reshape(L, E, d, d),
                torch.stack(params[1::2]).numpy().reshape(L, E, d))


def _forward(p: Plan, y0: torch.Tensor, params, keep: bool = False, flat=None):
    """Run the forward kernel and report its statistics to the blocks (warnings, errors);
    returns ``(Y, saved)``: the states and what the backward needs, as numpy arrays with the
    samples last (``irn._kernels``); with ``keep`` the iterates, their values of ``F``, the
    iteration counts and the means of their residual norms ``(L, K, E)`` (else empty)."""
    L, E = len(p.blocks), p.members
    dtype = y0.detach().numpy().dtype
    x = y0.detach().numpy().reshape(E, -1, y0.shape[-1])
    B, d = x.shape[1:]
    W, bias = _weights(p, params, flat, d)
    Y = np.empty((L + 1, E, d, B), dtype)
    Y[0] = x.transpose(0, 2, 1)
    Ystar, Fx, Fstar = (np.empty((L, E, d, B), dtype) for _ in range(3))
    iters = np.zeros((L, E), np.int64)
    resid = np.zeros((L, E), dtype)
    converged = np.zeros((L, E), np.bool_)
    fail = np.full((E, 3), -1, np.int64)
    atol, rtol, _, _, eps = p.stopping(y0.dtype)
    K = int(p.max_iters.max()) if keep else 0
    shape = (L, E, K, d, B) if keep else (1, 1, 1, 1, 1)
    Yk, Fk = np.empty(shape, dtype), np.empty(shape, dtype)
    means = np.zeros((L, K, E), dtype)
    c_exp, c_imp = p.coefficients(dtype)
    _run("forward", E, Y, Ystar, Fx, Fstar, W, bias, c_exp, c_imp, p.implicit, p.kind, atol,
         rtol.astype(dtype), p.max_iters, iters, resid, converged, fail, keep, Yk, Fk, means,
         p.solver, p.memory, p.regularization.astype(dtype),
         dtype.type(np.finfo(dtype).tiny ** 0.5))
    # eps max_b ||y*_b||, for the warnings of layers that did not converge
    floors = None if converged[p.solving].all() else np.where(  # absolute rules only
        (rtol == 0)[:, None], eps[:, None] * np.sqrt(np.square(Ystar).sum(axis=2)).max(axis=-1),
        np.nan)
    _report(p, "forward", iters, resid, converged, fail, reversed_order=False, floors=floors)
    return Y, (Ystar, Fx, Fstar, W, Yk, Fk, iters, means)


def _report(p: Plan, what: str, iters, resid, converged, fail, reversed_order: bool,
            stats=None, floors=None):
    """Hand each layer's statistics to its block, in the order the generic path solves them
    (last layer first for the backward), through the block's policy; raise the error the
    generic path raises first (by layer, iteration, member) when a member failed."""
    failing = [e for e, layer in enumerate(fail[:, 0].tolist()) if layer >= 0]
    first = None
    if failing:
        order = (lambda e: (-fail[e, 0], fail[e, 1], fail[e, 2] != K.SINGULAR, e)) \
            if reversed_order else (lambda e: (fail[e, 0], fail[e, 1], e))
        first = min(failing, key=order)
    layers = range(len(p.blocks) - 1, -1, -1) if reversed_order else range(len(p.blocks))
    iters, resid, converged = iters.tolist(), resid.tolist(), converged.tolist()  # one each
    for l in layers:
        block = p.blocks[l]
        if first is not None and fail[first, 0] == l:
            label = f"{block.name}, member {first}" if block.record.labels else block.name
            reason = ("I - J^T is singular (iteration 0)" if fail[first, 2] == K.SINGULAR else
                      f"non-finite value (NaN or inf) at iteration {fail[first, 1]}")
            raise SolverError(f"{label}: {what} solve failed: {reason}")
        record = block.record
        if not p.solving[l]:
            if what == "forward":
                record.no_solve(False)
            continue
        info = SolveInfo(iters[l], resid[l], converged[l], p.solver_names[l],
                         resolution=None if floors is None or np.isnan(floors[l, 0])
                         else floors[l].tolist())
        if what == "forward":
            record.forward(info, None, block.name)
        else:
            record.backward(info, stats[l], block.name)


class _Network(torch.autograd.Function):
    """Every hidden state of the network (or, with ``batch``, the perturbation distances and
    the clean last states, :func:`trajectory`), forward and backward in one compiled call
    each; with ``keep``, also the means of the iterates' residual norms ``(L, K, E)`` (their
    gradient goes through the kept iterates). The parameters come as the layers' tensors
    ``[W_0, b_0, W_1, ...]``, or as one (``flat``, a :class:`FlatParameters`: its ``data``)."""

    @staticmethod
    def forward(ctx, p: Plan, keep: bool, flat, batch, y0, *params):
        Y, saved = _forward(p, y0, params, keep, flat)
        first, clean = _outputs(Y, batch)
        means = torch.from_numpy(saved[-1])
        ctx.plan, ctx.keep, ctx.flat, ctx.batch = p, keep, flat, batch
        ctx.arrays = (Y,) + saved[:-1]
        ctx.stats = [block.record.stats for block in p.blocks]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(first, y0, *params)
        return (first, clean, means) if batch is not None else (first, torch.empty(0), means)

    @staticmethod
    def backward(ctx, grad_first, grad_clean, grad_means):
        first, y0, *params = ctx.saved_tensors
        p, flat, batch = ctx.plan, ctx.flat, ctx.batch
        keep = ctx.keep and grad_means is not None
        Y, Ystar, Fx, Fstar, W, Yk, Fk, counts = ctx.arrays  # (first: autograd's in-place check)
        L, E, d, B = Ystar.shape
        if torch.is_grad_enabled():  # a second derivative: the generic path's graph
            layers = p.parameters() if flat is not None else params
            grads = _generic_gradients(p, y0, layers, batch, grad_first, grad_clean,
                                       grad_means if keep else None)
            if flat is not None:  # the layers' gradients in the flat layout
                weights, biases = grads[1:][0::2], grads[1:][1::2]
                grads = grads[:1] + (torch.cat([g.reshape(-1) for g in weights + biases]),)
            return (None, None, None, None) + grads
        G = _state_gradient(Y, first, batch, grad_first, grad_clean)
        gmeans = grad_means.detach().numpy() if keep else np.zeros((1, 1, 1), Y.dtype)
        if flat is not None:  # the gradients written straight into the flat layout
            dflat = np.zeros(flat.data.shape[0], Y.dtype)
            dW, db = flat.arrays(L, E, d, dflat)
        else:
            dW, db = np.zeros_like(W), np.zeros((L, E, d), Y.dtype)
        dX = np.empty((E, d, B), Y.dtype)
        iters = np.zeros((L, E), np.int64)
        resid = np.zeros((L, E), Y.dtype)
        converged = np.zeros((L, E), np.bool_)
        fail = np.full((E, 3), -1, np.int64)
        c_exp, c_imp = p.coefficients(Y.dtype)
        _run("backward", E, Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, p.implicit, p.kind,
             p.method, *p.stopping(y0.dtype)[2:4], p.lin_max_iters, dW, db, dX, iters, resid,
             converged, fail, keep, Yk, Fk, gmeans, counts)
        _report(p, "backward", iters, resid, converged, fail, reversed_order=True,
                stats=ctx.stats)
        if flat is not None:
            grads = [torch.from_numpy(dflat)]
        else:
            shape = (L,) + tuple(params[0].shape)
            grads = [None] * len(params)  # views, one per layer: [dW_0, db_0, dW_1, ...]
            grads[0::2] = torch.from_numpy(dW).reshape(shape).unbind(0)
            grads[1::2] = torch.from_numpy(db).reshape(shape[:-1]).unbind(0)
        dx = (torch.from_numpy(np.ascontiguousarray(dX.transpose(0, 2, 1))).reshape(y0.shape)
              if ctx.needs_input_grad[4] else None)
        return (None, None, None, None, dx, *grads)


def _state_gradient(Y, first, batch, grad_first, grad_clean):
    """The gradient of the states, in the kernels' layout ``(L + 1, E, d, N)`` (contiguous),
    from those of :func:`trajectory`'s outputs."""
    if batch is None:
        if grad_first is None:
            return np.zeros(Y.shape, Y.dtype)
        return np.ascontiguousarray(grad_first.detach().numpy().transpose(0, 1, 3, 2))
    G = np.zeros(Y.shape, Y.dtype)
    if grad_first is not None:
        K.distances_backward(Y, first.numpy(), np.ascontiguousarray(grad_first.numpy()), G)
    if grad_clean is not None:
        G[-1, :, :, :batch] += grad_clean.numpy().transpose(0, 2, 1)
    return G


def _generic_gradients(p: Plan, y0, params, batch, grad_first, grad_clean, grad_means=None):
    """The gradients of a compiled forward through the generic path, differentiable
    (``create_graph``): the forward solved again on the generic path, the outputs of
    :func:`trajectory` computed from its states by tensor operations (with ``grad_means``,
    the gradient of the iterates' residual means, through its recorded iterates)."""
    net_states = [y0]
    for block in p.blocks:
        net_states.append(block.solve_members(net_states[-1]))
    states = torch.stack(net_states)
    if batch is None:
        outputs, grad_outputs = [states], [grad_first]
    else:
        clean, copies = states[:, :, :batch], states[:, :, batch:]
        copies = copies.reshape(copies.shape[:2] + (-1, batch) + copies.shape[-1:])
        outputs = [torch.linalg.vector_norm(copies - clean.unsqueeze(2), dim=-1), clean[-1]]
        grad_outputs = [grad_first, grad_clean]
    if grad_means is not None:
        kept = [(l, block.record.iterate_means) for l, block in enumerate(p.blocks)
                if block.keep_iterates]
        outputs += [m for _, m in kept]
        grad_outputs += [grad_means[l, :len(m)] for l, m in kept]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    wanted = [t for t in (y0, *params) if t.requires_grad]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                     create_graph=True, allow_unused=True,
                                     materialize_grads=True))
    return tuple(next(grads) if t.requires_grad else None for t in (y0, *params))
