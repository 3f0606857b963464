"""What implicit layers cost, measured side by side in one run (``make bench``).

Prints a table and writes it to ``benchmarks/results.md`` with the machine, the versions and
the command. Each workload's methods are measured in cycles that call every method's step
once, in alternating order, and the median over cycles is kept; ratios are taken within this
one run. On this shared machine measurements of the same step vary by up to 2x within
minutes, and bursts last from milliseconds to seconds: calls interleaved one by one meet the
same bursts, which blocks of calls per method (an earlier version) did not.

    python benchmarks/bench.py [--threads 1] [--min-time 3.0] [--min-cycles 31] [--quick]
                               [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import irn
import irn.compiled as C
from irn import solvers as S

sys.path.insert(0, str(Path(__file__).parent))
from reference import PlainImplicitBlock  # noqa: E402

try:
    import torchdeq
except ImportError:  # a benchmark-only dependency: `pip install torchdeq==0.1.0`
    torchdeq = None

WORKLOADS = {  # name: (dim, batch, layers, h, theta, tol)
    "W1 example 1, L=5": (2, 20, 5, 1.0, 0.5, 1e-6),
    "W1 example 1, L=20": (2, 20, 20, 0.25, 0.5, 1e-6),
    "W2 spirals": (4, 256, 100, 0.1, 0.5, 1e-6),
    "W3 wide": (256, 128, 10, 0.5, 0.5, 1e-5),
}


def residual_functions(dim, layers, seed=0):
    """``relu(W_l y + b_l)`` with ``W_l`` scaled to spectral norm 0.9."""
    torch.manual_seed(seed)
    fs = []
    for _ in range(layers):
        f = irn.functions.Perceptron(dim, "relu")
        with torch.no_grad():
            f.linear.weight.mul_(0.9 / torch.linalg.matrix_norm(f.linear.weight, ord=2))
        fs.append(f)
    return fs


class Chain(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, y):
        for block in self.blocks:
            y = block(y)
        return y


class DEQBlock(torch.nn.Module):
    """The same theta-block solved by torchdeq (implicit differentiation, its own solvers)."""

    def __init__(self, F, h, theta, tol, solver, max_iters=50):
        super().__init__()
        self.F, self.h, self.theta = F, h, theta
        # torchdeq's 'abs' stop mode is ours: max over the batch of per-sample residual norms
        self.deq = torchdeq.get_deq(f_solver=solver, b_solver="fixed_point_iter",
                                    f_max_iter=max_iters, b_max_iter=max_iters, f_tol=tol,
                                    b_tol=tol, f_stop_mode="abs", b_stop_mode="abs", ift=True)

    def forward(self, x):
        explicit = x + self.h * (1 - self.theta) * self.F(x)
        z, _ = self.deq(lambda z: explicit + self.h * self.theta * self.F(z), x)
        return z[-1]


def inputs(workload, device="cpu"):
    """The workload's input batch and regression target (seeded)."""
    dim, batch = WORKLOADS[workload][:2]
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1)).to(device)
    target = torch.randn(batch, dim, generator=torch.Generator().manual_seed(2)).to(device)
    return x, target


def build(workload, method, device="cpu", **block_kwargs):
    """``(net, step)`` for one method on one workload; ``block_kwargs`` override the irn
    blocks' settings (the memory table forces the iteration count with them)."""
    dim, batch, layers, h, theta, tol = WORKLOADS[workload]
    fs = [f.to(device) for f in residual_functions(dim, layers)]
    kind, _, arg = method.partition(":")
    if kind == "explicit":
        blocks = [irn.ImplicitResidualBlock(f, h, 0.0) for f in fs]
    elif kind == "irn":
        solver, backward = arg.split("/")
        settings = dict(solver=solver, backward=backward, tol=tol,
                        on_nonconvergence="ignore") | block_kwargs
        blocks = [irn.ImplicitResidualBlock(f, h, theta, **settings) for f in fs]
    elif kind == "plain":
        blocks = [PlainImplicitBlock(f, h, theta, tol) for f in fs]
    elif kind == "torchdeq":
        blocks = [DEQBlock(f, h, theta, tol, arg) for f in fs]
    if kind == "compiled":  # the same network, weights copied, on the compiled path
        solver, backward = arg.split("/")
        net = irn.ImplicitResNet(dim, layers, h, theta, activation="relu", init="pytorch",
                                 backend="compiled", solver=solver, backward=backward, tol=tol,
                                 on_nonconvergence="ignore").to(device)
        with torch.no_grad():
            for block, f in zip(net.blocks, fs):
                block.F.linear.weight.copy_(f.linear.weight)
                block.F.linear.bias.copy_(f.linear.bias)
    else:
        net = Chain(blocks)
    x, target = inputs(workload, device)

    def step():
        net.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x), target)
        loss.backward()

    return net, step


def methods_for(workload):
    dim = WORKLOADS[workload][0]
    methods = ["explicit", "plain", "irn:fixed_point/neumann", "irn:fixed_point/gmres"]
    if dim <= 16:
        methods.append("irn:fixed_point/direct")
    methods += ["irn:fixed_point/unrolled", "irn:anderson/neumann", "irn:broyden/neumann",
                "irn:nonlinear_cg/neumann", "irn:gradient_descent/neumann"]
    if torchdeq is not None:
        methods += ["torchdeq:fixed_point_iter", "torchdeq:anderson", "torchdeq:broyden"]
    dim, batch = WORKLOADS[workload][:2]
    if dim <= irn.compiled.compiled_widest(1, batch, torch.float32):  # where it is faster
        methods += ["compiled:fixed_point/neumann", "compiled:fixed_point/direct"]
    return methods


def interleaved_times(steps, min_time, min_cycles, sync=lambda: None):
    """Seconds per call of each of ``steps`` (a dict of callables), one list per step over
    cycles that call every step once (order reversed every other cycle), as many cycles as
    fit ``min_time`` seconds per step, at least ``min_cycles``."""
    for step in steps.values():  # warm-up
        step()
        step()
    sync()
    start = time.perf_counter()
    for step in steps.values():
        step()
    sync()
    cycle = time.perf_counter() - start
    cycles = max(min_cycles, int(min_time * len(steps) / cycle))
    samples = {name: [] for name in steps}
    order = list(steps)
    gc.collect()
    gc.disable()  # a collection inside one call would land on whichever step triggered it
    try:
        for i in range(cycles):
            for name in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                steps[name]()
                sync()
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return samples


ENSEMBLE_WORKLOADS = {  # name: (model factory, dataset, model settings, loss)
    "W1 example 1, L=20": ("function_approximator", "sine",
                           dict(num_layers=20, theta=0.5, T=5.0), "mse"),
    "W2 spirals, L=100": ("spiral_classifier", "two_spirals",
                          dict(num_layers=100, theta=0.5, T=10.0), "cross_entropy"),
}
ENSEMBLE_SIZES = (1, 10, 50)
ENSEMBLE_BATCH = {"W1 example 1, L=20": 20, "W2 spirals, L=100": 97}  # training set sizes


def ensemble_step(workload, members, device="cpu", backend="torch"):
    """``(model, step)``: one training step (forward, loss summed over members, backward,
    Adam as the training loop runs it) of one network (``members=None``) or of an ensemble of
    ``members`` networks of seeds ``0..members-1``, float64, on the example's full training
    set, on the generic path (``backend="torch"``) or the compiled one. The learning rate is
    small so that the iteration counts hardly drift over the timed calls."""
    from irn.paper import experiments, training
    from irn.models import ImplicitModel

    factory, data_name, settings, loss = ENSEMBLE_WORKLOADS[workload]
    settings = settings | dict(on_nonconvergence="ignore", backend=backend)
    with torch.random.fork_rng(devices=[]):
        models = [experiments.build_model(factory, seed, **settings).to(device)
                  for seed in range(members or 1)]
    model = models[0] if members is None else ImplicitModel.stack(models)
    data = experiments.DATASETS[data_name]().to(device=device, dtype=torch.float64)
    x, y = data.x_train, data.y_train
    if members is not None:
        x, y = x.expand(members, *x.shape), y.expand(members, *y.shape)
    optimizer = training.optimizer_for(model.parameters(), lr=1e-5)
    loss_fn = training.LOSSES[loss]

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        value = loss_fn(out, y) if members is None else training._member_losses(loss_fn, out, y)
        value.sum().backward()
        optimizer.step()

    step.optimizer = optimizer  # for the bounds table
    return model, step


def jax_problem(workload, members):
    """The workload for ``benchmarks/jax_reference.py``: ``(spec, params, model)`` with the
    initial weights of :func:`ensemble_step`'s model (stacked along a leading member axis for
    ``members``)."""
    import jax.numpy as jnp

    model, _ = ensemble_step(workload, members)
    factory, data_name, settings, loss = ENSEMBLE_WORKLOADS[workload]
    from irn.paper import experiments
    data = experiments.DATASETS[data_name]()
    block = model.net.blocks[0]
    net = model.net
    if members is None:
        blocks = [(b.F.linear.weight.detach().numpy(), b.F.linear.bias.detach().numpy())
                  for b in net.blocks]
        readout = model.readout
        readout = ((readout.weight.detach().numpy(), readout.bias.detach().numpy())
                   if isinstance(readout, torch.nn.Linear) else None)
    else:
        blocks = [(b.F.weight.detach().numpy(), b.F.bias.detach().numpy()) for b in net.blocks]
        readout = model.readout
        readout = ((readout.weight.detach().numpy(), readout.bias.detach().numpy())
                   if hasattr(readout, "weight") else None)
    params = {"blocks": [(jnp.asarray(w), jnp.asarray(b)) for w, b in blocks]}
    if readout is not None:
        params["readout"] = tuple(jnp.asarray(a) for a in readout)
    h = block.h if members is None else block.h[0]
    theta = block.theta if members is None else block.theta[0]
    spec = dict(dim=net.dim, h=h, theta=theta, activation=block.F.activation, tol=block.tol,
                max_iters=block.max_iters, x=data.x_train.numpy(), y=data.y_train.numpy(),
                loss=loss)
    return spec, params, model


def jax_step(workload, members):
    """The same training step in JAX (``benchmarks/jax_reference.py``), from the same initial
    weights as :func:`ensemble_step`: a callable running one jitted step (vmapped over
    ``members``), or None when JAX is not installed."""
    try:
        import jax_reference as J
    except ImportError:  # benchmark-only: `pip install -e ".[bench]"`
        return None
    import jax

    spec, params, _ = jax_problem(workload, members)
    step = J.compiled(J.training_step(spec), members)
    state = [J.initial_state(params)]

    def run():
        state[0] = step(state[0])
        jax.block_until_ready(state[0][0])

    return run


def ensemble_table(min_time, min_cycles, device="cpu", sync=lambda: None):
    """Time per training step of one network and of ensembles of E members, on the generic
    and the compiled path, against JAX, interleaved; then what bounds the compiled step."""
    lines = ["", "## Ensembles and the compiled path: time per training step, float64", "",
             "Each member is the example's network with its own seed (the members' solves stop "
             "on their own, so an ensemble iterates as long as its slowest member). A step: "
             "forward, loss, backward and the training loop's Adam. generic: "
             "`backend=\"torch\"`; compiled: `backend=\"compiled\"` (what `auto` picks here).",
             "", "| workload | model | ms / step | vs generic one network | per member "
             "| fwd iters / layer (max over members) |", "|---|---|---|---|---|---|"]
    bounds = []
    for workload in ENSEMBLE_WORKLOADS:
        built = {}
        for backend, path in (("torch", "generic"), ("compiled", "compiled")):
            built[f"{path}, one network"] = ensemble_step(workload, None, device, backend)
            built |= {f"{path}, E = {e}": ensemble_step(workload, e, device, backend)
                      for e in ENSEMBLE_SIZES if device == "cpu" or backend == "torch"}
        steps = {name: step for name, (_, step) in built.items() if device == "cpu"
                 or not name.startswith("compiled")}
        if device == "cpu":
            jax_steps = {"JAX one network": jax_step(workload, None),
                         "JAX vmap, E = 10": jax_step(workload, 10)}
            steps |= {name: step for name, step in jax_steps.items() if step is not None}
        samples = interleaved_times(steps, min_time, min_cycles, sync)
        times = {name: median(r) for name, r in samples.items()}
        one = times["generic, one network"]
        for name, t in times.items():
            members = 10 if "vmap" in name else int(name.split("= ")[1]) if "E =" in name else 1
            fwd = "" if name.startswith("JAX") else f"{max_iterations(built[name][0]):.1f}"
            lines.append(f"| {workload} | {name} | {1e3 * t:.2f} | {t / one:.3f}x "
                         f"| {1e3 * t / members:.3f} ms | {fwd} |")
            print(lines[-1], flush=True)
        lines += summary_rows(workload, times)
        if device == "cpu":
            bounds += compiled_bounds(workload, *built["compiled, one network"])
    if bounds:
        lines += ["", "### What bounds the compiled step (one network)", "",
                  "Medians over 200 steps timed one part at a time: the two kernel calls "
                  "(`irn.compiled`), the optimizer step alone, and the rest of the step "
                  "(autograd, the Python around the kernels, embedding, readout, loss). "
                  "`tanh` evaluations: how many the forward kernel makes, at the measured cost "
                  "of one compiled `math.tanh`.", "",
                  "| workload | step | forward kernel | backward kernel | Adam step | rest "
                  "| tanh in the forward |", "|---|---|---|---|---|---|---|"] + bounds
    return lines


#: the training step table's variants: (network settings, training settings)
STEP_VARIANTS = {
    "plain": ({}, {}),
    "R_fp": ({}, dict(fp_weight=1.0, fp_alpha=0.5)),
    "Anderson": (dict(solver="anderson", backward="direct", solver_options={"memory": 3},
                      max_iters=30), {}),
}


def harness_step(factory, data_name, settings, loss, members, train_settings=None, batch=None):
    """``(model, step)``: one step of the training loop of ``irn.paper.training`` (forward,
    loss, regularisers, backward, Adam and the epoch's bookkeeping, as ``train`` runs it) on
    the example's first ``batch`` training samples (None: all), float64, for one network
    (``members`` None) or an ensemble of seeds ``0..members-1``; ``backend="auto"``."""
    from irn.paper import experiments, training
    from irn.models import ImplicitModel

    with torch.random.fork_rng(devices=[]):
        models = [experiments.build_model(factory, seed, on_nonconvergence="ignore", **settings)
                  for seed in range(members or 1)]
    model = (models[0] if members is None else ImplicitModel.stack(models)).double()
    data = experiments.DATASETS[data_name]().to(dtype=torch.float64)
    regularizer = training.check_settings(members, epochs=1, loss=loss,
                                          **(train_settings or {})).on(torch.float64, "cpu")
    model.net.keep_iterates = regularizer.fp_on
    context = (C.flat_parameters(model.net) if C.reason(model.net) is None
               else contextlib.nullcontext())
    flat = context.__enter__()
    optimizer, zero_grad = training._optimizer(model, flat, lr=1e-5)
    n, count = batch or data.x_train.shape[0], members or 1
    generators = [torch.Generator().manual_seed(seed) for seed in range(count)]
    order = torch.arange(n).expand(count, n)
    gradients = training._MeanAbsGradients(model.net.blocks, members, flat)

    def step():
        training._epoch(model, data, order, n, optimizer, zero_grad, loss, regularizer,
                        generators if members else generators[0], gradients)
    step.context = context  # the flat parameters stay in place while the step lives
    return model, step


@contextlib.contextmanager
def timed_kernels():
    """While active, every compiled kernel call (``irn.compiled._run``) appends its seconds to
    the yielded ``{"forward": [...], "backward": [...]}``."""
    spent = {"forward": [], "backward": []}
    run = C._run

    def timed(name, members, *arrays):
        start = time.perf_counter()
        try:
            return run(name, members, *arrays)
        finally:
            spent[name].append(time.perf_counter() - start)

    C._run = timed
    try:
        yield spent
    finally:
        C._run = run


def step_and_kernel_times(steps, rounds, per_round):
    """Median seconds per call of each of ``steps`` and of the compiled kernels inside those
    calls, in ``rounds`` rounds of ``per_round`` calls of every step (interleaved)."""
    whole, kernels = ({name: [] for name in steps} for _ in range(2))
    gc.disable()
    try:
        with timed_kernels() as spent:
            for step in steps.values():
                step()
            for _ in range(rounds):
                for name, step in steps.items():
                    before, start = sum(map(sum, spent.values())), time.perf_counter()
                    for _ in range(per_round):
                        step()
                    whole[name].append((time.perf_counter() - start) / per_round)
                    kernels[name].append((sum(map(sum, spent.values())) - before) / per_round)
    finally:
        gc.enable()
    return ({name: median(v) for name, v in whole.items()},
            {name: median(v) for name, v in kernels.items()})


def training_step_table(rounds=15, per_round=3, members=50):
    """The training loop's whole step against the compiled kernels inside it: Example 1
    ensembles of ``members`` (L = 5 and 20, both layouts; plain, R_fp, Anderson) per member,
    and W1 and W2 as one network."""
    lines = ["", "## The training loop's step against its kernels, float64", "",
             "A step of `irn.paper.training` (forward, loss, regularisers, backward, Adam, the "
             "epoch's bookkeeping) on the full training set, `backend=\"auto\"` (compiled); "
             "kernels: the forward and backward kernel calls inside those same steps. "
             f"Medians of {rounds} interleaved rounds of {per_round} steps. Example 1 at "
             "theta = 0.5, T = 5; R_fp: weight 1, alpha 0.5; Anderson: memory 3, `direct` "
             "backward, at most 30 iterations (the paper profile's).", "",
             "| workload | variant | ms / step (per member) | kernels (per member) "
             "| step / kernels | per member vs plain |", "|---|---|---|---|---|---|"]
    for layers in (5, 20):
        for layout in ("state", "embedded"):
            steps = {}
            for variant, (settings, train_settings) in STEP_VARIANTS.items():
                steps[variant] = harness_step(
                    "function_approximator", "sine",
                    dict(num_layers=layers, theta=0.5, T=5.0, layout=layout) | settings, "mse",
                    members, train_settings)[1]
            whole, kernels = step_and_kernel_times(steps, rounds, per_round)
            for variant in steps:
                lines.append(f"| Example 1, L = {layers}, {layout}, E = {members} | {variant} "
                             f"| {1e3 * whole[variant] / members:.3f} "
                             f"| {1e3 * kernels[variant] / members:.3f} "
                             f"| {whole[variant] / kernels[variant]:.2f}x "
                             f"| {whole[variant] / whole['plain']:.2f}x |")
                print(lines[-1], flush=True)
    # both cores on one ensemble: the compiled kernels give each thread whole members
    step = harness_step("function_approximator", "sine",
                        dict(num_layers=20, theta=0.5, T=5.0, layout="state"), "mse", members)[1]
    threads = torch.get_num_threads()
    per_threads = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        per_threads[n] = step_and_kernel_times({"plain": step}, rounds, per_round)[0]["plain"]
    torch.set_num_threads(threads)
    lines.append(f"| Example 1, L = 20, state, E = {members}, two threads | plain "
                 f"| {1e3 * per_threads[2] / members:.3f} | | | {per_threads[2] / per_threads[1]:.2f}x "
                 f"of one thread |")
    print(lines[-1], flush=True)
    singles = {workload: harness_step(factory, data_name, settings, loss, None)[1]
               for workload, (factory, data_name, settings, loss) in ENSEMBLE_WORKLOADS.items()}
    whole, kernels = step_and_kernel_times(singles, rounds, 10 * per_round)
    for workload in singles:
        lines.append(f"| {workload}, one network | plain | {1e3 * whole[workload]:.3f} "
                     f"| {1e3 * kernels[workload]:.3f} | {whole[workload] / kernels[workload]:.2f}x "
                     f"| |")
        print(lines[-1], flush=True)
    return lines


def max_iterations(model):
    """Mean over layers of the largest forward iteration count among the members."""
    stats = [b.last_stats if model.members else [b.last_stats] for b in model.net.blocks]
    return sum(max(s.iterations for s in layer) for layer in stats) / len(stats)


def summary_rows(workload, times):
    """The ratios the compiled path is judged by (one run: each ratio within it)."""
    rows = []
    pairs = [("compiled one network vs generic one network", "compiled, one network",
              "generic, one network", 1),
             ("compiled one network vs JAX one network", "compiled, one network",
              "JAX one network", 1),
             ("compiled E = 10 vs JAX vmap E = 10 (per member alike)", "compiled, E = 10",
              "JAX vmap, E = 10", 1),
             ("generic E = 10 vs JAX vmap E = 10", "generic, E = 10", "JAX vmap, E = 10", 1)]
    for label, a, b, _ in pairs:
        if a in times and b in times:
            rows.append(f"| {workload} | **{label}** | {times[a] / times[b]:.2f}x | | | |")
    return rows


def compiled_bounds(workload, model, step, repeats=200):
    """One row of the bounds table: the compiled step's parts, timed (see ensemble_table)."""
    whole, adam = [], []
    with timed_kernels() as spent:
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            whole.append(time.perf_counter() - start)
    for _ in range(repeats):
        start = time.perf_counter()
        step.optimizer.step()
        adam.append(time.perf_counter() - start)
    forward, backward, total, adam = (median(v) for v in (spent["forward"], spent["backward"],
                                                            whole, adam))
    net = model.net
    batch = ENSEMBLE_BATCH[workload]
    # F is evaluated once per iteration of an implicit layer (F(x) first, then F(y^k) for every
    # iterate but the last, whose F the output reuses), once per explicit layer
    evaluations = sum(max(b.last_stats.iterations, 1) for b in net.blocks)
    tanh = evaluations * batch * net.dim if net.blocks[0].F.activation == "tanh" else 0
    per_tanh = tanh_cost()
    return [f"| {workload} | {1e3 * total:.3f} ms | {1e3 * forward:.3f} ms | "
            f"{1e3 * backward:.3f} ms | {1e3 * adam:.3f} ms | "
            f"{1e3 * (total - forward - backward - adam):.3f} ms | "
            f"{tanh} x {1e9 * per_tanh:.0f} ns = {1e3 * tanh * per_tanh:.3f} ms |"]


def tanh_cost(n=100_000):
    """Seconds per compiled ``math.tanh`` (the kernels' activation), median of 21 loops."""
    import numpy as np
    from numba import njit

    @njit(cache=False)
    def loop(a, out):
        for i in range(a.size):
            out[i] = math.tanh(a[i])

    a = np.random.default_rng(0).standard_normal(n)
    out = np.empty_like(a)
    loop(a, out)
    times = []
    for _ in range(21):
        start = time.perf_counter()
        loop(a, out)
        times.append(time.perf_counter() - start)
    return median(times) / n


def median(values):
    return sorted(values)[len(values) // 2]


def iterations(net):
    stats = [b.last_stats for b in net.blocks if hasattr(b, "last_stats") and b.last_stats]
    if not stats:
        return "", ""
    fwd = sum(s.iterations for s in stats) / len(stats)
    bwd = sum(s.backward_iterations or 0 for s in stats) / len(stats)
    return f"{fwd:.1f}", f"{bwd:.1f}"


def saved_bytes(net, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    del out
    return sum(storages.values())


def memory_net(backward=None, iterations=5, workload="W3 wide"):
    """The workload's network with every solve forced to ``iterations`` fixed-point
    iterations (``backward`` None: the explicit ResNet), and its input."""
    method = "explicit" if backward is None else f"irn:fixed_point/{backward}"
    net, _ = build(workload, method, tol=1e-30, max_iters=iterations)
    return net, inputs(workload)[0]


def peak_memory(step):
    """Peak of the tensor memory allocated during one call of ``step``, above what was live
    before it. From the allocations and frees that ``torch.profiler`` records
    (``profile_memory``), in time order: the process's resident size would mostly show the C
    allocator's caching."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        # an operator's own allocations net of its frees; "[memory]" events: frees outside one
        live += (event.cpu_memory_usage if event.name == "[memory]"
                 else event.self_cpu_memory_usage)
        peak = max(peak, live)
    return peak


def step_peak_memory(net, x):
    """:func:`peak_memory` of one forward + backward (gradients included), after a warm-up."""
    def step():
        torch.nn.functional.mse_loss(net(x), x).backward()

    step()
    net.zero_grad(set_to_none=True)
    return peak_memory(step)


def memory_table():
    """Bytes saved for backward and peak memory of a step, explicit ResNet and each backward
    at 5 / 20 / 40 forced iterations: ``(explicit, rows)``, each a pair (saved, peak)."""
    explicit = saved_bytes(*memory_net()), step_peak_memory(*memory_net())
    rows = []
    for backward in ("neumann", "gmres", "unrolled"):
        rows.append([backward] + [(saved_bytes(*memory_net(backward, k)),
                                   step_peak_memory(*memory_net(backward, k)))
                                  for k in (5, 20, 40)])
    return explicit, rows


def overhead(workload="W3 wide", min_time=1.0):
    """Time of one fixed-point iteration / time of one evaluation of F plus the update."""
    dim, batch, _, h, theta, _ = WORKLOADS[workload]
    f = residual_functions(dim, 1)[0]
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        explicit = x + h * (1 - theta) * f(x)

        def g(y):
            return torch.add(explicit, f(y[0]), alpha=h * theta)[None]

        def solve(k):
            return lambda: S.solve(("fixed_point",), {}, g, x[None], tol=1e-30, max_iters=k,
                                   active=[True])

        samples = interleaved_times({"45": solve(45), "5": solve(5), "g": lambda: g(x[None])},
                                    min_time, min_cycles=31)
        per_iter = (median(samples["45"]) - median(samples["5"])) / 40
        floor = median(samples["g"])
    return per_iter, floor


class _Products(TorchDispatchMode):
    """Counts and times the matrix products (``mm``, ``addmm``, ``bmm``) run under it,
    those of the backward too: their kernels' wall time, in place, with the caches as the
    step leaves them (the same product alone in a loop runs ~1.5x faster here)."""

    PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                torch.ops.aten.bmm.default)

    def __init__(self):
        super().__init__()
        self.count, self.flops, self.seconds = 0, 0, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in self.PRODUCTS:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - start
        a, b = args[-2], args[-1]  # (.., m, k) @ (.., k, n): 2 m k n flops per matrix
        self.count, self.flops = self.count + 1, self.flops + 2 * a.numel() * b.shape[-1]
        return out


def matrix_products(step, repeats=21):
    """(number, flops) of the matrix products of one call of ``step``, and the medians of the
    time in products and of the whole step's time, over ``repeats`` pairs of calls (one timed
    whole, one with its products timed), interleaved so that the machine's noise hits both."""
    step()
    whole, in_products = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        whole.append(time.perf_counter() - start)
        with _Products() as counter:
            step()
        in_products.append(counter.seconds)
    return counter.count, counter.flops, median(in_products), median(whole)


def wait_for_quiet(limit_s=60, threshold=0.5):
    """The machine is shared: wait (up to limit_s) for the 1-minute load to drop."""
    start = time.time()
    while os.getloadavg()[0] > threshold and time.time() - start < limit_s:
        time.sleep(5)
    return os.getloadavg()[0]


def products_table(built, times, workload="W3 wide"):
    """What bounds a step on W3: the time its matrix products take inside the step, against
    the step's time, both measured in the same interleaved calls."""
    lines = ["", "## What bounds W3: matrix products per step", "",
             "Time in products: the wall time of the step's `mm` / `addmm` / `bmm` kernels, "
             "timed one by one inside a step; ms / step: the whole step, timed in calls "
             "interleaved with those (medians of 21 each, so this table's step times differ "
             "a little from the first table's).", "",
             "| method | products / step | GFLOP / step | ms in products | ms / step "
             "| share of the step in products |", "|---|---|---|---|---|---|"]
    in_products, whole = {}, {}
    for method in ("explicit", "plain", "irn:fixed_point/neumann", "irn:fixed_point/unrolled",
                   "torchdeq:fixed_point_iter", "torchdeq:anderson"):
        if method not in built:
            continue
        count, flops, in_products[method], whole[method] = matrix_products(built[method][1])
        lines.append(f"| {method} | {count} | {flops / 1e9:.2f} | "
                     f"{1e3 * in_products[method]:.1f} | {1e3 * whole[method]:.1f} | "
                     f"{in_products[method] / whole[method]:.0%} |")
    irn_, deq = "irn:fixed_point/neumann", "torchdeq:fixed_point_iter"
    if deq in whole:
        # methods are measured one after the other here, so a ratio across them drifts with
        # the machine; the share in products is measured within one method's calls
        share, headline = in_products[irn_] / whole[irn_], times[irn_] / times[deq]
        lines += ["", f"irn fixed_point/neumann spends {share:.0%} of its step in products; with "
                  f"the first table's {headline:.2f}x torchdeq fixed_point_iter's step, its "
                  f"products alone come to **{share * headline:.2f}x** torchdeq's step: the "
                  "lowest ratio that irn's products allow, however little else it did."]
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=3.0,
                        help="seconds of calls per method and workload")
    parser.add_argument("--min-cycles", type=int, default=31,
                        help="fewest cycles (one call of every method each) per workload")
    parser.add_argument("--quick", action="store_true", help="W1 only, short measurements")
    parser.add_argument("--only-ensembles", action="store_true",
                        help="only the ensemble table")
    parser.add_argument("--only-steps", action="store_true",
                        help="only the table of the training loop's step against its kernels")
    parser.add_argument("--device", default="cpu",
                        help="where the steps run; on 'cuda' only the step-time table (the "
                             "other sections time CPU kernels)")
    parser.add_argument("--output", type=Path, help="results file (default: results.md, "
                        "results_steps.md with --only-steps)")
    args = parser.parse_args()
    if args.output is None:
        args.output = Path(__file__).parent / ("results_steps.md" if args.only_steps
                                               else "results.md")
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    load_before = wait_for_quiet()
    only = args.only_ensembles or args.only_steps
    workloads = [] if only else list(WORKLOADS)[:2] if args.quick else list(WORKLOADS)

    lines = ["# Benchmarks", "",
             f"Command: `{' '.join([Path(sys.executable).name] + sys.argv)}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores "
             f"({_cpu_name()}); torch {torch.__version__}, {args.threads} thread(s), "
             f"irn {irn.__version__}, torchdeq "
             f"{getattr(torchdeq, '__version__', 'installed') if torchdeq else 'not installed'}  ",
             f"Device: {args.device}"
             + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
             + "  ", f"Load average before: {load_before:.2f}", ""]

    if workloads:
        lines += ["## Time per training step (forward + MSE + backward), float32", "",
                  "| workload | method | ms / step | vs explicit | vs plain | vs unrolled "
                  "| fwd iters / layer | bwd iters / layer |", "|---|---|---|---|---|---|---|---|"]
    all_built, all_times = {}, {}
    for workload in workloads:
        built = {method: build(workload, method, args.device) for method in methods_for(workload)
                 if args.device == "cpu" or not method.startswith("compiled")}
        samples = interleaved_times({method: step for method, (_, step) in built.items()},
                                    args.min_time, args.min_cycles, sync)
        times = {method: median(r) for method, r in samples.items()}
        all_built[workload], all_times[workload] = built, times
        iters = {method: iterations(net) for method, (net, _) in built.items()}
        for method, t in times.items():
            r = sorted(samples[method])
            print(f"  {workload:<20} {method:<32} {1e3 * t:9.2f} ms  ({len(r)} calls, "
                  f"90th / 10th percentile {r[9 * len(r) // 10] / r[len(r) // 10]:.2f})",
                  flush=True)
        ref, unrolled = times["plain"], times["irn:fixed_point/unrolled"]
        for method, t in times.items():
            fwd, bwd = iters[method]
            lines.append(f"| {workload} | {method} | {1e3 * t:.2f} | {t / times['explicit']:.2f}x "
                         f"| {t / ref:.2f}x | {t / unrolled:.2f}x | {fwd} | {bwd} |")
        if torchdeq is not None:
            # the ratio within each cycle, its 10th and 90th percentiles over cycles: how far
            # this machine's noise moves the headline
            per_cycle = sorted(a / b for a, b in zip(samples["irn:fixed_point/neumann"],
                                                     samples["torchdeq:fixed_point_iter"]))
            n = len(per_cycle)
            lines.append(f"| {workload} | **irn fixed_point/neumann vs torchdeq fixed_point_iter** | "
                         f"{times['irn:fixed_point/neumann'] / times['torchdeq:fixed_point_iter']:.2f}x "
                         f"| within a cycle: median {per_cycle[n // 2]:.2f}x, 10th to 90th "
                         f"percentile {per_cycle[n // 10]:.2f}x to {per_cycle[9 * n // 10]:.2f}x "
                         f"| | | | |")

    if not args.only_steps:
        lines += ensemble_table(args.min_time, args.min_cycles, args.device, sync)
    if not args.only_ensembles and args.device == "cpu":
        lines += training_step_table()
    if not only and args.device == "cpu":
        lines += regularizer_table(args.min_time, args.min_cycles)

    if not (args.quick or only) and args.device == "cpu":
        explicit, rows = memory_table()
        for i, (title, how) in enumerate((
                ("Bytes saved for backward", "the storages autograd keeps for the backward "
                 "(saved-tensor hooks, each storage counted once)"),
                ("Peak memory of a step", "the most tensor memory live at once during one "
                 "forward + backward, above what was live before it, gradients included "
                 "(`torch.profiler` allocation records). Bytes saved for backward count also "
                 "what `unrolled` saves on graph branches that are dropped during the forward "
                 "(the residual norms of the stopping rule), and they count the weights, which "
                 "exist before the step: hence peaks below them"))):
            lines += ["", f"## {title}, W3 (forced 5 / 20 / 40 iterations)", "", how + ".", "",
                      f"Explicit ResNet: {explicit[i] / 2**20:.2f} MiB", "",
                      "| backward | 5 | 20 | 40 | 40 vs 5 | 40 vs explicit |",
                      "|---|---|---|---|---|---|"]
            for name, *cells in rows:
                b = [cell[i] for cell in cells]
                lines.append(f"| {name} | " + " | ".join(f"{v / 2**20:.2f} MiB" for v in b)
                             + f" | {b[2] / max(b[0], 1):.2f}x | {b[2] / max(explicit[i], 1):.2f}x |")
                print(lines[-1], flush=True)
        per_iter, floor = overhead(min_time=args.min_time)
        lines += ["", "## Per-iteration overhead, W3", "",
                  f"One fixed-point iteration: {1e6 * per_iter:.1f} us; one evaluation of F plus "
                  f"the update: {1e6 * floor:.1f} us; ratio **{per_iter / floor:.2f}x**"]
        print(lines[-1], flush=True)
        lines += products_table(all_built["W3 wide"], all_times["W3 wide"])
        print("\n".join(lines[-12:]), flush=True)
    lines += ["", f"Load average after: {os.getloadavg()[0]:.2f}"]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {args.output}")


def regularizer_table(min_time, min_cycles, workloads=("W1 example 1, L=20", "W2 spirals")):
    """Time per training step with the Jacobian regulariser (1 and 4 probes) against the same
    step without it, on the generic and the compiled path, interleaved."""
    lines = ["", "## The Jacobian regulariser's cost per training step, float32", "",
             "`loss + 0.1 * irn.regularizers.jacobian(net, probes)` at the kept solutions; "
             "ratios to the step without it, measured in the same interleaved calls.", "",
             "| workload | path | no regulariser | probes = 1 | probes = 4 |",
             "|---|---|---|---|---|"]
    for workload in workloads:
        dim, batch, layers, h, theta, tol = WORKLOADS[workload]
        x, target = inputs(workload)
        steps = {}
        for backend in ("torch", "compiled"):
            net = irn.ImplicitResNet(dim, layers, h, theta, activation="relu", init="pytorch",
                                     backend=backend, tol=tol, on_nonconvergence="ignore")
            net.keep_solution = True
            for probes in (0, 1, 4):
                def step(net=net, probes=probes):
                    net.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.mse_loss(net(x), target)
                    if probes:
                        loss = loss + 0.1 * irn.regularizers.jacobian(net, probes)
                    loss.backward()
                steps[backend, probes] = step
        samples = interleaved_times(steps, min_time, min_cycles)
        for backend in ("torch", "compiled"):
            base = median(samples[backend, 0])
            cells = [f"{1e3 * base:.2f} ms"] + [
                f"{1e3 * median(samples[backend, k]):.2f} ms ({median(samples[backend, k]) / base:.2f}x)"
                for k in (1, 4)]
            lines.append(f"| {workload} | {'generic' if backend == 'torch' else 'compiled'} | "
                         + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
