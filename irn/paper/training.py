"""The training loop of the examples: Adam with a step-decayed learning rate, optional
regularisers, and a per-epoch record of losses and solver statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import operator
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import missing_extra

try:
    import pandas as pd
    from tqdm import tqdm
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.training", err) from err

from .. import compiled, regularizers
from .._checks import choice, integer, per_member, require
from .history import per_layer
from .losses import LOSSES
from ..models import ImplicitModel

_ITERATIONS, _CONVERGED = operator.attrgetter("iterations"), operator.attrgetter("converged")
# modules whose forward depends on train()/eval()
MODE_DEPENDENT = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)


class _MeanAbsGradients:
    """Mean absolute gradient entry of each block's parameters, shape ``(L,)`` (``(E, L)`` for
    an ensemble, member by member): the gradients joined into one ``(E, N)`` tensor, one
    reduction per layer's columns on the host (one transfer). The parameters are listed
    once (walking the modules at every step cost more than a compiled step)."""

    def __init__(self, blocks, members: int | None, flat=None):
        self.members, self.layers, self.flat = members, len(blocks), flat
        self.params = [(l, p) for l, block in enumerate(blocks) for p in block.parameters()]
        self.columns = [p.numel() // (members or 1) for _, p in self.params]
        self.all_owners = self._owners([True] * len(self.params))

    def _owners(self, present):
        """The layer of each column of the joined gradients, and each layer's column count."""
        owner = np.repeat([l for (l, _), kept in zip(self.params, present) if kept],
                          [c for c, kept in zip(self.columns, present) if kept])
        return owner, np.bincount(owner, minlength=self.layers)

    def __call__(self) -> np.ndarray:
        members, count = self.members, self.members or 1
        if self.flat is not None:  # the layers' gradients as one tensor: four reductions
            grad, split, layers = self.flat.grad, self.flat.split, self.layers
            with torch.no_grad():
                sums = (grad[:split].view(layers, count, -1).abs().sum(dim=2)
                        + grad[split:].view(layers, count, -1).abs().sum(dim=2))
            means = (sums / (grad.numel() // (layers * count))).T.cpu().numpy()  # (E, L)
            return means[0] if members is None else means
        grads = [p.grad for _, p in self.params]
        present = [g is not None for g in grads]
        if not any(present):
            return np.zeros(self.layers) if members is None else np.zeros((members, self.layers))
        owner, sizes = self.all_owners if all(present) else self._owners(present)
        with torch.no_grad():
            flat = torch.cat([g.reshape(count, -1) for g in grads if g is not None],
                             dim=1).abs().cpu().numpy()  # (E, N)
        sums = np.stack([np.bincount(owner, weights=row, minlength=self.layers) for row in flat])
        means = sums / np.maximum(sizes, 1)
        return means[0] if members is None else means


def _optimizer(model: ImplicitModel, flat, lr: float):
    """``(optimizer, zero_grad)`` of a training run: Adam over the model's parameters, where
    ``flat`` (an ``irn.compiled.FlatParameters`` of its network, or None) stands for the
    network's layers as one tensor."""
    if flat is None:
        optimizer = optimizer_for(model.parameters(), lr)
        return optimizer, lambda: optimizer.zero_grad(set_to_none=True)
    layers = {id(t) for t in flat.params}
    optimizer = optimizer_for([flat.data] + [p for p in model.parameters() if id(p) not in layers], lr)

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)
        flat.reset()  # the layers' gradients are views of flat.grad: zeroed, not dropped
    return optimizer, zero_grad


def optimizer_for(parameters, lr: float) -> torch.optim.Adam:
    """The training loop's Adam: the fused implementation (one kernel for every parameter
    tensor; a 20-layer network has 40 of them, and the per-tensor implementations then cost
    more than its forward and backward together, see benchmarks/results.md)."""
    return torch.optim.Adam(parameters, lr=lr, fused=True)


def _member_losses(loss_fn, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """An ensemble's data loss per member, shape ``(E,)``: ``loss_fn`` (mean reduction) on each
    member's ``(out[e], target[e])``, computed for all members at once."""
    members, batch = out.shape[:2]
    per_sample = loss_fn(out.reshape(members * batch, *out.shape[2:]),
                         target.reshape(members * batch, *target.shape[2:]), reduction="none")
    return per_sample.reshape(members, -1).mean(dim=1)


def evaluate(model: ImplicitModel, x: torch.Tensor, y: torch.Tensor, loss: str = "mse"):
    """Loss (and accuracy, for classification) of ``model`` on ``(x, y)`` without gradients.
    For an ensemble every member is evaluated on the same ``(x, y)``: a list of dicts."""
    choice("loss", loss, LOSSES)
    members = model.members
    with torch.no_grad():
        if members is None:
            out = model(x)
            result = {"loss": float(LOSSES[loss](out, y))}
            if loss == "cross_entropy":
                result["accuracy"] = float((out.argmax(dim=1) == y).double().mean())
            return result
        out = model(x.expand(members, *x.shape))
        target = y.expand(members, *y.shape)
        losses = _member_losses(LOSSES[loss], out, target).tolist()
        results = [{"loss": value} for value in losses]
        if loss == "cross_entropy":
            accuracy = (out.argmax(dim=2) == target).double().mean(dim=1).tolist()
            for result, value in zip(results, accuracy):
                result["accuracy"] = value
        return results


def train(model: ImplicitModel, data, *, epochs: int, lr: float = 1e-2, lr_step: int = 300,
          lr_gamma: float = 0.5, loss: str = "mse", batch_size: int | None = None,
          stab_weight=0.0, stab_sigma=0.05, stab_beta=1.0, stab_streams: int = 2,
          fp_weight=0.0, fp_alpha=0.5, jac_weight=0.0, jac_probes: int = 1, seed=0,
          val_every: int = 1, device="cpu",
          progress: bool = True, desc: str | None = None):
    """Train ``model`` (an :class:`irn.models.ImplicitModel`) with Adam on ``data``.

    Loss: ``data_loss + fp_weight R_fp(alpha) + stab_weight R_stab(sigma, beta, streams)
    + jac_weight R_J(jac_probes)`` (:func:`irn.regularizers.jacobian`, its probe vectors drawn
    from the generator that draws R_stab's perturbations).
    The learning rate is multiplied by ``lr_gamma`` every ``lr_step`` epochs. ``batch_size``
    None is full batch (the paper's setting). ``seed`` seeds minibatch order and the
    perturbations of ``R_stab``. ``val_every`` evaluates the validation split after every
    ``val_every``-th epoch and the last one only (NaN in between: a validation forward costs
    about a third of a training step). Returns one row per epoch: ``train_loss`` (data loss,
    mean over the epoch's steps), ``reg_loss``, ``val_loss`` after the epoch (and, for
    cross-entropy, ``train_accuracy`` of the epoch's forward passes and ``val_accuracy``
    after the epoch), ``converged`` (every solve of the
    epoch met its tolerance), and per layer ``l``: ``forward_iterations_l``,
    ``backward_iterations_l`` (means over the epoch's steps) and ``grad_l`` (mean absolute
    gradient of the layer's parameters). Progress is shown with tqdm.

    An ensemble (``ImplicitModel.stack``) trains every member as it would train alone: the
    loss is the sum of the members' losses, so each member's gradients and Adam state are its
    own. ``seed`` and the regulariser settings (``stab_weight``, ``stab_sigma``,
    ``stab_beta``, ``fp_weight``, ``fp_alpha``, ``jac_weight``) may then be one value per member; each member
    draws its minibatch order and perturbations from its own seed. Returns one history per
    member.
    """
    members = model.members
    seeds = per_member("seed", seed, members)
    regularizer = check_settings(members, epochs=epochs, lr=lr, loss=loss, val_every=val_every,
                                 stab_weight=stab_weight, stab_sigma=stab_sigma,
                                 stab_beta=stab_beta, stab_streams=stab_streams,
                                 fp_weight=fp_weight, fp_alpha=fp_alpha, jac_weight=jac_weight,
                                 jac_probes=jac_probes)
    dtype = next(model.parameters()).dtype
    model.to(device)
    data = data.to(device=device, dtype=dtype)
    model.net.keep_iterates = regularizer.fp_on
    model.net.keep_solution = regularizer.jac_on
    regularizer = regularizer.on(dtype, device)
    # on the compiled path the layers train as one tensor (irn.compiled.flat_parameters)
    flat_context = (compiled.flat_parameters(model.net) if torch.device(device).type == "cpu"
                    and compiled.reason(model.net) is None
                    and compiled.flat_unsupported(model.net) is None else contextlib.nullcontext())
    with flat_context as flat:
        return _train(model, data, flat, epochs, lr, lr_step, lr_gamma, loss, batch_size,
                      regularizer, seeds, val_every, device, progress, desc)


def _train(model, data, flat, epochs, lr, lr_step, lr_gamma, loss, batch_size, regularizer,
           seeds, val_every, device, progress, desc):
    """:func:`train`'s loop, its settings checked (``flat``: see :func:`_optimizer`)."""
    members = model.members
    count = members or 1
    optimizer, zero_grad = _optimizer(model, flat, lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)
    member_seeds = seeds if members else [seeds]
    generators = [torch.Generator(device=torch.device(device)).manual_seed(s) for s in member_seeds]
    order_generators = [torch.Generator().manual_seed(s) for s in member_seeds]
    n = data.x_train.shape[0]
    batch_size = n if batch_size is None else batch_size

    # train/eval switches walk every module; skip them when no module's forward depends on it
    switch_modes = any(isinstance(m, MODE_DEPENDENT) for m in model.modules())
    gradients = _MeanAbsGradients(model.net.blocks, members, flat)
    model.train()
    rows = [[] for _ in range(count)]
    bar = tqdm(range(epochs), desc=desc, disable=not progress, mininterval=1.0)
    for epoch in bar:
        if switch_modes:
            model.train()
        totals = _epoch(model, data, _order(n, batch_size, order_generators).to(device),
                        batch_size, optimizer, zero_grad, loss, regularizer,
                        generators if members else generators[0], gradients)
        scheduler.step()
        if switch_modes:
            model.eval()
        if (epoch + 1) % val_every == 0 or epoch + 1 == epochs:
            val = evaluate(model, data.x_val, data.y_val, loss)
            val = val if members else [val]
        else:
            val = [{"loss": np.nan, "accuracy": np.nan}] * count
        for e, result in enumerate(val):
            rows[e].append(totals.row(e, epoch + 1, result, n, loss == "cross_entropy"))
        if not np.isnan(rows[0][-1]["val_loss"]):
            bar.set_postfix(loss=f"{np.median(totals.train_loss) / totals.steps:.2e}",
                            val=f"{np.median([r[-1]['val_loss'] for r in rows]):.2e}", refresh=False)
    histories = [pd.DataFrame(r) for r in rows]
    return histories[0] if members is None else histories


def check_settings(members: int | None = None, *, epochs: int, lr: float = 1e-2, loss="mse",
                   val_every: int = 1, lr_step: int = 300, lr_gamma: float = 0.5,
                   batch_size: int | None = None, **rest) -> "_Regularizer":
    """The checks of :func:`train`'s settings (``ValueError`` naming the setting), made where
    the settings are given (:class:`irn.paper.experiments.Job` checks a job's with it); the
    regularisers' settings of ``members`` (None: one network) as a :class:`_Regularizer`."""
    choice("loss", loss, LOSSES)
    integer("epochs", epochs)
    integer("val_every", val_every)
    integer("lr_step", lr_step)
    for name, value in (("lr", lr), ("lr_gamma", lr_gamma)):
        require(isinstance(value, (int, float)) and value > 0, f"{name} must be > 0, got {value!r}")
    if batch_size is not None:
        integer("batch_size", batch_size)
    fields = _Regularizer.__dataclass_fields__
    settings = {k: v for k, v in (TRAIN_DEFAULTS | rest).items() if k in fields}
    return _Regularizer.of(members, **settings)


#: train's settings with a default, and the defaults
TRAIN_DEFAULTS = {name: p.default for name, p in inspect.signature(train).parameters.items()
                  if p.default is not inspect.Parameter.empty}


@dataclass(frozen=True)
class _Regularizer:
    """The regularisers of a training run: ``stab_weight * R_stab(stab_sigma, stab_beta,
    stab_streams) + fp_weight * R_fp(fp_alpha) + jac_weight * R_J(jac_probes)``, each setting
    one value or (an ensemble) one per member; the weights as ``(E,)`` tensors once :meth:`on`
    a dtype and device."""

    members: int | None
    stab_weight: object
    stab_sigma: object
    stab_beta: object
    stab_streams: int
    fp_weight: object
    fp_alpha: object
    jac_weight: object
    jac_probes: int

    @classmethod
    def of(cls, members, **settings) -> "_Regularizer":
        streams, probes = settings.pop("stab_streams"), settings.pop("jac_probes")
        require(isinstance(probes, int) and probes >= 1, f"jac_probes must be an int >= 1, got {probes!r}")
        values = {name: per_member(name, value, members) for name, value in settings.items()}
        for name in ("stab_weight", "fp_weight", "jac_weight"):
            weights = values[name] if members else [values[name]]
            require(all(v >= 0 for v in weights), f"{name} must be >= 0, got {values[name]!r}")
        return cls(members, stab_streams=streams, jac_probes=probes, **values)

    def _weights(self, name):
        return getattr(self, name) if self.members else [getattr(self, name)]

    # read at every step: computed once (iterating over an (E,) tensor costs 3 us per member)
    @functools.cached_property
    def stab_on(self) -> bool:
        return any(float(w) > 0 for w in self._weights("stab_weight"))

    @functools.cached_property
    def fp_on(self) -> bool:
        return any(float(w) > 0 for w in self._weights("fp_weight"))

    @functools.cached_property
    def jac_on(self) -> bool:
        return any(float(w) > 0 for w in self._weights("jac_weight"))

    def on(self, dtype, device) -> "_Regularizer":
        if self.members is None:
            return self
        return dataclasses.replace(self, **{name: torch.tensor(getattr(self, name), dtype=dtype,
                                                               device=device)
                                            for name in ("stab_weight", "fp_weight", "jac_weight")})


def _order(n: int, batch_size: int, generators) -> torch.Tensor:
    """The sample order of one epoch, one row per member: each member's own random order (as
    its solo run draws it) when minibatching, ``0..n-1`` for full batches."""
    if batch_size < n:
        return torch.stack([torch.randperm(n, generator=g) for g in generators])
    return torch.arange(n).expand(len(generators), n)


def _epoch(model, data, order, batch_size, optimizer, zero_grad, loss, regularizer, generator,
           gradients: _MeanAbsGradients):
    """One epoch of Adam steps over the minibatches of ``order`` (one row of sample indices per
    member); returns its :class:`_EpochTotals`."""
    members, blocks = model.members, list(model.net.blocks)
    totals = _EpochTotals(members or 1, len(blocks), gradients)
    for start in range(0, order.shape[1], batch_size):
        index = order[:, start:start + batch_size]
        if members is None:
            index = index[0]
        x, y = data.x_train[index], data.y_train[index]  # (E,) B, ...
        zero_grad()
        data_loss, reg, out = _losses(model, x, y, LOSSES[loss], regularizer, generator)
        (data_loss + reg).sum().backward()
        optimizer.step()
        totals.add(data_loss, reg, out, y, blocks, members, classify=loss == "cross_entropy")
    return totals


def _losses(model, x, y, loss_fn, regularizer: _Regularizer, generator):
    """``(data loss, regulariser, output)`` of one step; per member ``(E,)`` for an ensemble."""
    members = model.members
    y0 = model.embed(x)
    reg = torch.zeros(() if members is None else (members,), dtype=y0.dtype, device=y0.device)
    if regularizer.stab_on:
        r_stab, y_last = regularizers.perturbation(
            model.net, y0, regularizer.stab_sigma, regularizer.stab_beta,
            regularizer.stab_streams, generator=generator, return_output=True)
        reg = reg + regularizer.stab_weight * r_stab
    else:
        y_last = model.net(y0)
    if regularizer.fp_on:
        reg = reg + regularizer.fp_weight * regularizers.fixed_point(model.net, regularizer.fp_alpha)
    if regularizer.jac_on:
        reg = reg + regularizer.jac_weight * regularizers.jacobian(
            model.net, regularizer.jac_probes, generator=generator)
    out = model.readout(y_last)
    data_loss = loss_fn(out, y) if members is None else _member_losses(loss_fn, out, y)
    return data_loss, reg, out


class _EpochTotals:
    """Sums over an epoch's steps, per member: losses, correct predictions, and per layer the
    forward and backward iterations and mean absolute gradients; whether every solve
    converged."""

    def __init__(self, count: int, layers: int, mean_abs_gradients: _MeanAbsGradients):
        self.mean_abs_gradients = mean_abs_gradients
        self.train_loss, self.reg_loss, self.correct = (np.zeros(count) for _ in range(3))
        self.fwd, self.bwd, self.grad = (np.zeros((count, layers)) for _ in range(3))
        self.converged, self.steps = np.ones(count, dtype=bool), 0

    def add(self, data_loss, reg, out, y, blocks, members, classify: bool) -> None:
        count = len(self.train_loss)
        self.steps += 1
        self.train_loss += data_loss.detach().cpu().numpy()
        self.reg_loss += reg.detach().cpu().numpy()
        if classify:
            self.correct += (out.detach().argmax(dim=-1) == y).reshape(count, -1).sum(dim=1).cpu().numpy()
        records = [block.record for block in blocks]  # each member's statistics, per layer
        stats = [s for record in records for s in record.stats]  # layer by layer
        self.fwd += np.reshape(list(map(_ITERATIONS, stats)), (-1, count)).T
        self.bwd += np.reshape([s.backward_iterations or 0 for s in stats], (-1, count)).T
        converged = np.reshape(list(map(_CONVERGED, stats)), (-1, count)).all(axis=0)
        for record in records:
            bconv = record.backward_converged  # None until a backward solve ran (per member)
            if bconv is not None:
                converged &= [ok is not False for ok in bconv]
        self.converged &= converged
        self.grad += self.mean_abs_gradients()

    def row(self, e: int, epoch: int, val: dict, n: int, classify: bool) -> dict:
        """Member ``e``'s row of the history for this epoch (``val``: its validation result)."""
        steps = self.steps
        row = {"epoch": epoch, "train_loss": self.train_loss[e] / steps,
               "reg_loss": self.reg_loss[e] / steps, "val_loss": val["loss"]}
        if classify:
            row["train_accuracy"] = self.correct[e] / n
            row["val_accuracy"] = val["accuracy"]
        row["converged"] = bool(self.converged[e])
        for l in range(self.fwd.shape[1]):
            row[f"forward_iterations_{l}"] = self.fwd[e, l] / steps
            row[f"backward_iterations_{l}"] = self.bwd[e, l] / steps
            row[f"grad_{l}"] = self.grad[e, l] / steps
        return row


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
