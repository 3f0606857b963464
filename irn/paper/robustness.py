"""Robustness of a trained classifier, measured: accuracy under test-time Gaussian noise and
under adversarial perturbations (FGSM, PGD in the L-infinity ball), and the per-layer growth
of a perturbation of the hidden state.

The attacks differentiate through the model as it is: through an implicit layer the input
gradient comes from the layer's own backward (the adjoint solve of ``irn.layers``), not from
unrolled iterations.
"""

from __future__ import annotations

import hashlib

import numpy as np
from .._checks import missing_extra

try:
    import pandas as pd
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.robustness", err) from err
import torch

from . import cache
from .._checks import choice, require
from .parallel import executor, run_all
from ..regularizers import noise, perturbation_distances
from .losses import LOSSES


def _check_bounds(bounds):
    require(bounds is None or (len(bounds) == 2 and bounds[0] < bounds[1]),
             f"bounds must be None or (low, high) with low < high, got {bounds!r}")


def _clip(x, bounds):
    return x if bounds is None else x.clamp(*bounds)


def input_gradient(model, x: torch.Tensor, y: torch.Tensor, loss: str = "cross_entropy"):
    """``d loss(model(x), y) / dx`` with the loss summed over the batch (so each sample's
    gradient is its own); the model's parameters get no gradient."""
    choice("loss", loss, LOSSES)
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        value = LOSSES[loss](model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(value, x)
    return grad


def fgsm(model, x, y, epsilon: float, *, loss: str = "cross_entropy", bounds=None):
    """Fast gradient sign method: ``x + epsilon * sign(grad_x loss)``, clipped to ``bounds``
    (``(low, high)`` of the input domain, or None)."""
    require(epsilon >= 0, f"epsilon must be >= 0, got {epsilon!r}")
    _check_bounds(bounds)
    if epsilon == 0:
        return x.detach().clone()
    return _clip(x + epsilon * input_gradient(model, x, y, loss).sign(), bounds).detach()


def pgd(model, x, y, epsilon: float, *, steps: int = 10, step_size: float | None = None,
        random_start: bool = True, generator: torch.Generator | None = None,
        loss: str = "cross_entropy", bounds=None):
    """Projected gradient ascent on the loss in the L-infinity ball of radius ``epsilon``::

        x^{k+1} = Proj_{||x' - x||_inf <= epsilon, bounds}(x^k + step_size * sign(grad loss(x^k)))

    from a uniform random start in the ball (``generator`` seeds it); ``step_size`` defaults
    to ``2.5 epsilon / steps`` (Madry et al., 2018)."""
    require(epsilon >= 0, f"epsilon must be >= 0, got {epsilon!r}")
    require(isinstance(steps, int) and steps >= 1, f"steps must be an int >= 1, got {steps!r}")
    require(step_size is None or step_size > 0, f"step_size must be > 0, got {step_size!r}")
    _check_bounds(bounds)
    x = x.detach()
    if epsilon == 0:
        return x.clone()
    step_size = 2.5 * epsilon / steps if step_size is None else step_size
    adv = x
    if random_start:
        start = noise(x.shape, x, generator, uniform=True)
        adv = _clip(x + epsilon * (2 * start - 1), bounds)
    for _ in range(steps):
        adv = adv + step_size * input_gradient(model, adv, y, loss).sign()
        adv = _clip(torch.minimum(torch.maximum(adv, x - epsilon), x + epsilon), bounds)
    return adv.detach()


ATTACKS = {"fgsm": fgsm, "pgd": pgd}


@torch.no_grad()
def accuracy(model, x, y) -> float:
    """Share of samples whose largest logit is the label."""
    return float((model(x).argmax(dim=1) == y).double().mean())


def noise_accuracy(model, x, y, sigmas, *, repeats: int = 10,
                   generator: torch.Generator | None = None, bounds=None) -> pd.DataFrame:
    """Accuracy on ``x + sigma * xi``, ``xi ~ N(0, I)`` (clipped to ``bounds``), averaged over
    ``repeats`` draws per ``sigma``: columns ``size`` (sigma), ``accuracy``."""
    require(isinstance(repeats, int) and repeats >= 1,
             f"repeats must be an int >= 1, got {repeats!r}")
    require(all(s >= 0 for s in sigmas), f"sigmas must be >= 0, got {list(sigmas)!r}")
    _check_bounds(bounds)
    rows = []
    for sigma in sigmas:
        draws = repeats if sigma > 0 else 1
        total = 0.0
        for _ in range(draws):
            total += accuracy(model, _clip(x + sigma * noise(x.shape, x, generator), bounds), y)
        rows.append({"size": float(sigma), "accuracy": total / draws})
    return pd.DataFrame(rows)


def adversarial_accuracy(model, x, y, epsilons, attack: str = "fgsm",
                         **attack_kwargs) -> pd.DataFrame:
    """Accuracy on ``ATTACKS[attack](model, x, y, epsilon, **attack_kwargs)`` for each
    ``epsilon``: columns ``size`` (epsilon), ``accuracy``."""
    choice("attack", attack, ATTACKS)
    rows = [{"size": float(eps),
             "accuracy": accuracy(model, ATTACKS[attack](model, x, y, eps, **attack_kwargs), y)}
            for eps in epsilons]
    return pd.DataFrame(rows)


@torch.no_grad()
def growth_per_layer(model, x, sigma: float, *, streams: int = 10,
                        generator: torch.Generator | None = None) -> np.ndarray:
    """Per-layer growth of a perturbation of the hidden state: ``d_l / d_{l-1}``,
    ``l = 1..L``, averaged over samples and ``streams`` Gaussian perturbations
    ``y~_0 = embed(x) + sigma xi`` (the distances of ``R_stab``; > 1 where layer ``l``
    amplifies the perturbation)."""
    require(sigma > 0, f"sigma must be > 0, got {sigma!r}")
    d, _ = perturbation_distances(model.net, model.embed(x), sigma, streams, generator)
    return (d[1:] / d[:-1]).mean(dim=(1, 2)).cpu().numpy()


@torch.no_grad()
def perturbation_gain(model, x, sigma: float, *, streams: int = 10,
                      generator: torch.Generator | None = None) -> float:
    """``log10 (d_L / d_0)``, the amplification of a perturbation ``y~_0 = embed(x) + sigma xi``
    of the hidden state through all ``L`` layers, averaged (in log10) over samples and
    ``streams`` draws: > 0 where the trained network amplifies small perturbations."""
    require(sigma > 0, f"sigma must be > 0, got {sigma!r}")
    d, _ = perturbation_distances(model.net, model.embed(x), sigma, streams, generator)
    return float(torch.log10(d[-1] / d[0]).mean())


@torch.no_grad()
def forward_iterations(model, x) -> tuple[float, bool]:
    """Mean forward-solver iterations per layer of ``model(x)``, and whether every layer's
    solve met its tolerance."""
    model(x)
    stats = [block.last_stats for block in model.net.blocks]
    return float(np.mean([s.iterations for s in stats])), all(s.converged for s in stats)


def measure(model, data, *, sigmas, epsilons, pgd_steps: int = 10, repeats: int = 10,
             growth_sigma: float = 0.01, growth_streams: int = 10, bounds=None,
             seed: int = 0):
    """Every robustness measurement of one trained classifier on ``data``'s validation split.

    Returns ``(curves, growth, summary)``: ``curves`` has columns ``perturbation``
    (``gaussian``, ``fgsm``, ``pgd``), ``size`` (sigma or epsilon), ``accuracy``;
    ``growth`` is :func:`growth_per_layer` at ``growth_sigma``; ``summary`` holds
    ``clean_accuracy``, ``forward_iterations`` (mean per layer on the clean inputs) and
    ``converged``. ``seed`` seeds the noise and the PGD starts.
    """
    x, y = data.x_val, data.y_val
    generator = torch.Generator(device=x.device).manual_seed(seed)
    curves = [noise_accuracy(model, x, y, sigmas, repeats=repeats, generator=generator,
                             bounds=bounds).assign(perturbation="gaussian"),
              adversarial_accuracy(model, x, y, epsilons, "fgsm", bounds=bounds
                                   ).assign(perturbation="fgsm"),
              adversarial_accuracy(model, x, y, epsilons, "pgd", steps=pgd_steps,
                                   generator=generator, bounds=bounds).assign(perturbation="pgd")]
    growth = growth_per_layer(model, x, growth_sigma, streams=growth_streams,
                                 generator=generator)
    iterations, converged = forward_iterations(model, x)
    summary = {"clean_accuracy": accuracy(model, x, y), "forward_iterations": iterations,
               "converged": converged}
    curves = pd.concat(curves, ignore_index=True)[["perturbation", "size", "accuracy"]]
    return curves, growth, summary


def _measure_task(task):
    model, data, settings = task
    return measure(model, data, **settings)


def _fingerprint(tensors) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes: what a measurement of a model depends on."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _measurement_key(task) -> str:
    model, data, settings = task
    return cache.key({"evaluate": settings, "model": repr(model),
                      "weights": _fingerprint(model.state_dict().values()),
                      "data": _fingerprint([data.x_train, data.y_train, data.x_val, data.y_val])},
                     cache.EVALUATION_SOURCES)


def measure_many(tasks: list, workers: int = 1, *, cache_dir=None, executor=None) -> list:
    """:func:`measure` of every ``(model, data, settings)`` in ``tasks`` (``settings``: the
    keyword arguments of :func:`measure`), ``workers`` processes at a time (or on
    ``executor``); results in order and the same wherever they ran (every measurement is
    seeded by its own ``seed``). With ``cache_dir`` a measurement is looked up by the model's
    weights, the data, the settings and the sources (:mod:`irn.paper.cache`) before it is made."""
    require(isinstance(workers, int) and workers >= 1, f"workers must be an int >= 1, got {workers!r}")
    tasks = list(tasks)
    results = [None] * len(tasks)
    keys = [_measurement_key(task) for task in tasks] if cache_dir else None
    for i in range(len(tasks) if cache_dir else 0):
        found = cache.load(cache_dir, keys[i])
        if found is not None and sorted(found[0]) == ["curves", "growth", "summary"]:
            tables = found[0]
            results[i] = (tables["curves"], tables["growth"].growth.to_numpy(),
                          tables["summary"].iloc[0].to_dict())
    todo = [i for i, result in enumerate(results) if result is None]

    def done(index, result):  # stored as it finishes: a later failure keeps it
        i = todo[index]
        results[i] = result
        if cache_dir:
            curves, growth, summary = result
            cache.store(cache_dir, keys[i], {"curves": curves,
                                             "growth": pd.DataFrame({"growth": growth}),
                                             "summary": pd.DataFrame([summary])}, {})

    run_all(_measure_task, [tasks[i] for i in todo], workers, on_done=done, executor=executor)
    return results


def measure_models(models: dict, setup, workers: int = 1, *, cache_dir=None,
                   dask_scheduler: str | None = None) -> list:
    """:func:`measure_many` of every model of ``models`` (in their order), ``setup(key)`` giving
    the ``(data, settings)`` of the model at ``key``; on the Dask scheduler at
    ``dask_scheduler`` if given, else ``workers`` local processes."""
    tasks = [(model, *setup(key)) for key, model in models.items()]
    with executor(dask_scheduler) as pool:
        return measure_many(tasks, workers, cache_dir=cache_dir, executor=pool)


def summary_table(curves: pd.DataFrame, summary: pd.DataFrame, sigma: dict, epsilon: dict,
              by=("dataset", "theta", "regularizer")) -> pd.DataFrame:
    """One row per model (the columns ``by``) of the long frames of :func:`measure` over
    seeds (``curves`` and ``summary`` with the columns ``by`` and ``seed`` added): mean and
    standard deviation over seeds (in %) of ``clean_accuracy`` and of the accuracy under
    ``gaussian`` noise at ``sigma[dataset]`` and ``fgsm`` / ``pgd`` at ``epsilon[dataset]``
    (``*_std``), the mean ``forward_iterations`` and ``converged_seeds``."""
    keys = list(by) + ["seed"]
    per_seed = summary.set_index(keys)
    for kind, size_of in (("gaussian", sigma), ("fgsm", epsilon), ("pgd", epsilon)):
        rows = curves[(curves.perturbation == kind)
                      & (curves["size"] == curves.dataset.map(size_of))]
        require(len(rows) == len(per_seed), f"every dataset's {kind} size must be one of its "
                                            f"grid's sizes, got {size_of!r}")
        per_seed[kind] = rows.set_index(keys).accuracy
    metrics = ["clean_accuracy", "gaussian", "fgsm", "pgd"]
    groups = per_seed.groupby(level=list(by), sort=False)
    return pd.concat({m: 100 * groups[m].mean() for m in metrics}
                     | {f"{m}_std": 100 * groups[m].std(ddof=0) for m in metrics}
                     | {"forward_iterations": groups.forward_iterations.mean(),
                        "converged_seeds": groups.converged.sum()}, axis=1)
