"""The training loop of the examples: Adam with a step-decayed learning rate, optional
regularisers, and a per-epoch record of losses and solver statistics."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import regularizers
from ._checks import choice, require
from .data import digits, sine, two_spirals
from .models import ImplicitModel, digits_classifier, function_approximator, spiral_classifier

# modules whose forward depends on train()/eval()
MODE_DEPENDENT = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)
LOSSES = {"mse": torch.nn.functional.mse_loss, "cross_entropy": torch.nn.functional.cross_entropy}


def per_layer(history: pd.DataFrame, name: str) -> np.ndarray:
    """The per-layer columns ``{name}_0 .. {name}_{L-1}`` of a training history: ``(epochs, L)``.
    ``name`` is ``forward_iterations``, ``backward_iterations`` or ``grad``."""
    columns = [c for c in history.columns if c.rsplit("_", 1)[0] == name and c.rsplit("_", 1)[1].isdigit()]
    require(bool(columns), f"name must be one of ('forward_iterations', "
                            f"'backward_iterations', 'grad'), got {name!r}")
    columns.sort(key=lambda c: int(c.rsplit("_", 1)[1]))
    # histories of deeper models concatenated with this one leave its extra columns empty
    return history[columns].dropna(axis=1, how="all").to_numpy()


def _mean_abs_gradients(blocks) -> np.ndarray:
    """Mean absolute gradient entry of each block's parameters (one batched reduction and
    one host transfer for all blocks)."""
    grads, owner, sizes = [], [], np.zeros(len(blocks))
    for l, block in enumerate(blocks):
        for p in block.parameters():
            if p.grad is not None:
                grads.append(p.grad)
                owner.append(l)
                sizes[l] += p.grad.numel()
    if not grads:
        return np.zeros(len(blocks))
    with torch.no_grad():
        l1 = torch.stack(torch._foreach_norm(grads, 1)).cpu().numpy()
    return np.bincount(owner, weights=l1, minlength=len(blocks)) / np.maximum(sizes, 1)


def evaluate(model: ImplicitModel, x: torch.Tensor, y: torch.Tensor, loss: str = "mse") -> dict:
    """Loss (and accuracy, for classification) of ``model`` on ``(x, y)`` without gradients."""
    choice("loss", loss, LOSSES)
    with torch.no_grad():
        out = model(x)
        result = {"loss": float(LOSSES[loss](out, y))}
        if loss == "cross_entropy":
            result["accuracy"] = float((out.argmax(dim=1) == y).double().mean())
    return result


def train(model: ImplicitModel, data, *, epochs: int, lr: float = 1e-2, lr_step: int = 300,
          lr_gamma: float = 0.5, loss: str = "mse", batch_size: int | None = None,
          stab_weight: float = 0.0, stab_sigma: float = 0.05, stab_beta: float = 1.0,
          stab_streams: int = 2, fp_weight: float = 0.0, fp_alpha: float = 0.5,
          seed: int = 0, device="cpu", progress: bool = True, desc: str | None = None
          ) -> pd.DataFrame:
    """Train ``model`` (an :class:`irn.models.ImplicitModel`) with Adam on ``data``.

    Loss: ``data_loss + fp_weight R_fp(alpha) + stab_weight R_stab(sigma, beta, streams)``.
    The learning rate is multiplied by ``lr_gamma`` every ``lr_step`` epochs. ``batch_size``
    None is full batch (the paper's setting). ``seed`` seeds minibatch order and the
    perturbations of ``R_stab``. Returns one row per epoch: ``train_loss`` (data loss, mean
    over the epoch's steps), ``reg_loss``, ``val_loss`` after the epoch (and, for
    cross-entropy, ``train_accuracy`` of the epoch's forward passes and ``val_accuracy``
    after the epoch), ``converged`` (every solve of the
    epoch met its tolerance), and per layer ``l``: ``forward_iterations_l``,
    ``backward_iterations_l`` (means over the epoch's steps) and ``grad_l`` (mean absolute
    gradient of the layer's parameters). Progress is shown with tqdm.
    """
    choice("loss", loss, LOSSES)
    require(isinstance(epochs, int) and epochs >= 1, f"epochs must be an int >= 1, got {epochs!r}")
    require(lr > 0, f"lr must be > 0, got {lr!r}")
    require(stab_weight >= 0 and fp_weight >= 0, "stab_weight and fp_weight must be >= 0")
    dtype = next(model.parameters()).dtype
    model.to(device)
    data = data.to(device=device, dtype=dtype)
    blocks = list(model.net.blocks)
    model.net.keep_iterates = fp_weight > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    batch_size = n if batch_size is None else batch_size
    loss_fn = LOSSES[loss]

    # train/eval switches walk every module; skip them when no module's forward depends on it
    switch_modes = any(isinstance(m, MODE_DEPENDENT) for m in model.modules())
    model.train()
    rows = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, mininterval=1.0)
    for epoch in bar:
        if switch_modes:
            model.train()
        order = torch.randperm(n, generator=order_generator) if batch_size < n else torch.arange(n)
        sums = {"train_loss": 0.0, "reg_loss": 0.0, "correct": 0.0}
        fwd, bwd, grad = (np.zeros(len(blocks)) for _ in range(3))
        converged, steps = True, 0
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size].to(device)
            x, y = data.x_train[index], data.y_train[index]
            optimizer.zero_grad(set_to_none=True)
            y0 = model.embed(x)
            reg = torch.zeros((), dtype=dtype, device=device)
            if stab_weight > 0:
                r_stab, y_last = regularizers.perturbation(
                    model.net, y0, stab_sigma, stab_beta, stab_streams, generator=generator,
                    return_output=True)
                reg = reg + stab_weight * r_stab
            else:
                y_last = model.net(y0)
            if fp_weight > 0:
                reg = reg + fp_weight * regularizers.fixed_point(model.net, fp_alpha)
            out = model.readout(y_last)
            data_loss = loss_fn(out, y)
            (data_loss + reg).backward()
            optimizer.step()
            steps += 1
            sums["train_loss"] += float(data_loss.detach())
            sums["reg_loss"] += float(reg.detach())
            if loss == "cross_entropy":
                sums["correct"] += float((out.detach().argmax(dim=1) == y).sum())
            for l, block in enumerate(blocks):
                stats = block.last_stats
                fwd[l] += stats.iterations
                bwd[l] += stats.backward_iterations or 0
                converged &= stats.converged and block.backward_converged is not False
            grad += _mean_abs_gradients(blocks)
        scheduler.step()
        if switch_modes:
            model.eval()
        row = {"epoch": epoch + 1, "train_loss": sums["train_loss"] / steps,
               "reg_loss": sums["reg_loss"] / steps}
        val = evaluate(model, data.x_val, data.y_val, loss)
        row["val_loss"] = val["loss"]
        if loss == "cross_entropy":
            row["train_accuracy"] = sums["correct"] / n
            row["val_accuracy"] = val["accuracy"]
        row["converged"] = converged
        for l in range(len(blocks)):
            row[f"forward_iterations_{l}"] = fwd[l] / steps
            row[f"backward_iterations_{l}"] = bwd[l] / steps
            row[f"grad_{l}"] = grad[l] / steps
        rows.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.2e}", val=f"{row['val_loss']:.2e}", refresh=False)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- several models

MODEL_FACTORIES = {"function_approximator": function_approximator,
                   "spiral_classifier": spiral_classifier, "digits_classifier": digits_classifier}
DATASETS = {"sine": sine, "two_spirals": two_spirals, "digits": digits}


def build_model(model: str, seed: int, dtype=torch.float64, **model_kwargs) -> ImplicitModel:
    """``MODEL_FACTORIES[model](**model_kwargs)`` initialised from ``torch.manual_seed(seed)``."""
    choice("model", model, MODEL_FACTORIES)
    torch.manual_seed(seed)
    return MODEL_FACTORIES[model](**model_kwargs).to(dtype)


def _run_job(job: dict):
    torch.set_num_threads(1)  # one job per core
    model = build_model(job["model"], job["seed"], **job["model_kwargs"])
    history = train(model, DATASETS[job["data"]](), seed=job["seed"], progress=False,
                    **job["train_kwargs"])
    return history, {k: v.cpu() for k, v in model.state_dict().items()}


def train_many(jobs: list[dict], workers: int = 1, desc: str = "training"):
    """Train independent models, ``workers`` at a time in separate processes.

    Each job is a dict with ``model`` (a key of ``MODEL_FACTORIES``), ``model_kwargs``,
    ``data`` (a key of ``DATASETS``), ``train_kwargs`` (for :func:`train`) and ``seed``
    (initialisation and training noise). A job's result does not depend on ``workers``.
    Returns ``[(model, history), ...]`` in the order of ``jobs``; progress is shown per job.
    """
    require(isinstance(workers, int) and workers >= 1, f"workers must be an int >= 1, got {workers!r}")
    for job in jobs:
        missing = {"model", "model_kwargs", "data", "train_kwargs", "seed"} - set(job)
        require(not missing, f"job is missing keys {sorted(missing)}")
        choice("data", job["data"], DATASETS)
    bar = tqdm(total=len(jobs), desc=desc, mininterval=0)
    results = [None] * len(jobs)
    if workers == 1:
        for i, job in enumerate(jobs):
            results[i] = _run_job(job)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")  # fork is unsafe after torch started
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_run_job, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    trained = []
    for job, (history, state) in zip(jobs, results):
        model = build_model(job["model"], job["seed"], **job["model_kwargs"])
        model.load_state_dict(state)
        trained.append((model, history))
    return trained


def summarize(histories: pd.DataFrame, by=("depth", "theta")) -> pd.DataFrame:
    """One row per model of a long history frame (the histories of :func:`train` with the
    columns ``by`` and ``seed`` added): ``seeds``, ``converged_seeds`` (seeds whose every
    solve of every epoch converged), ``converged_epochs`` (share of epochs), the final
    ``train_loss`` and ``val_loss`` (median over seeds, with ``*_min`` and ``*_max``), and the
    mean ``forward_iterations`` and ``backward_iterations`` per layer in the last epoch."""
    rows = []
    for key, group in histories.groupby(list(by), sort=True):
        last = group[group.epoch == group.epoch.max()]
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row["seeds"] = group.seed.nunique()
        row["converged_seeds"] = int(group.groupby("seed").converged.all().sum())
        row["converged_epochs"] = float(group.converged.mean())
        for column in ("train_loss", "val_loss"):
            row[column] = last[column].median()
            row[f"{column}_min"], row[f"{column}_max"] = last[column].min(), last[column].max()
        for name in ("forward_iterations", "backward_iterations"):
            row[name] = float(np.nanmean(per_layer(last, name)))
        rows.append(row)
    return pd.DataFrame(rows)
