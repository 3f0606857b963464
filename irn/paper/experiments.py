"""Experiments: training jobs as values, and sweeps of them (grouping into ensembles, a cost
model to start the longest first, the cache of trained models, local processes or a Dask
cluster).

A :class:`Job` is one training run: which model and data, its network, solver and training
settings in their own fields, a seed, and ``tags`` that name it in the results. :func:`run`
trains a list of jobs and returns ``(models, histories)``: the trained models keyed by
``(*tags, seed)`` and one long history frame with the tags and the seed as columns. Jobs
that differ only in seed, ``theta`` and regulariser settings train as one ensemble
(docs/design.md, section 5), with the results each would get alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import itertools
import json
import math
from dataclasses import dataclass, field

import torch

from .._checks import missing_extra

try:
    import pandas as pd
    from tqdm import tqdm
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.experiments", err) from err

from . import cache
from .._checks import choice, require
from .parallel import executor, run_all
from .data import digits, sine, swiss_roll, two_spirals
from ..config import SolveConfig
from ..models import ImplicitModel, ImplicitResNet
from .examples import digits_classifier, function_approximator, spiral_classifier
from .training import TRAIN_DEFAULTS, check_settings, train


def _keywords(function, skip=()) -> tuple[str, ...]:
    return tuple(name for name, p in inspect.signature(function).parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in skip)


#: what a job's ``training`` may set: the keywords of train but those the sweep sets itself
TRAIN_SETTINGS = _keywords(train, skip=("model", "data", "seed", "progress"))

#: the examples' models and data sets, by the names jobs use
MODEL_FACTORIES = {"function_approximator": function_approximator,
                   "spiral_classifier": spiral_classifier, "digits_classifier": digits_classifier}
DATASETS = {"sine": sine, "two_spirals": two_spirals, "swiss_roll": swiss_roll, "digits": digits}
#: what a job's ``network`` may set, per model: the factory's keywords and the network's own
NETWORK_SETTINGS = {name: tuple(dict.fromkeys(_keywords(factory) + _keywords(
    ImplicitResNet.__init__, ("self", "dim", "num_layers", "h", "theta"))))
    for name, factory in MODEL_FACTORIES.items()}
#: what a job's ``solver`` may set, and the defaults
SOLVER_SETTINGS = tuple(f.name for f in dataclasses.fields(SolveConfig))
SOLVER_DEFAULTS = dataclasses.asdict(SolveConfig())


def build_model(model: str, seed: int, dtype=torch.float64, **model_kwargs) -> ImplicitModel:
    """``MODEL_FACTORIES[model](**model_kwargs)`` initialised from ``torch.manual_seed(seed)``,
    in a forked random state: the caller's global generator is left as it was."""
    choice("model", model, MODEL_FACTORIES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODEL_FACTORIES[model](**model_kwargs).to(dtype)


# settings in which jobs of one ensemble may differ: the rest must be equal
MEMBER_MODEL_SETTINGS = ("theta",)
MEMBER_TRAIN_SETTINGS = ("stab_weight", "stab_sigma", "stab_beta", "fp_weight", "fp_alpha",
                         "jac_weight")


def _check_job(job: dict) -> None:
    missing = {"model", "model_kwargs", "data", "train_kwargs", "seed"} - set(job)
    require(not missing, f"job is missing keys {sorted(missing)}")
    choice("data", job["data"], DATASETS)
    choice("model", job["model"], MODEL_FACTORIES)


def ensemble_key(job: dict) -> str:
    """What jobs of one ensemble share: everything but the seed, ``theta`` and the
    regulariser weights and sizes, except whether each regulariser is on (a member without
    R_stab must not solve for perturbed copies, which would change its stopping rule; one
    without the Jacobian regulariser must not draw its probes, which would move its R_stab
    noise)."""
    train_kwargs = job["train_kwargs"]
    key = dict(model=job["model"], data=job["data"],
               model_kwargs={k: v for k, v in job["model_kwargs"].items()
                             if k not in MEMBER_MODEL_SETTINGS},
               train_kwargs={k: v for k, v in train_kwargs.items()
                             if k not in MEMBER_TRAIN_SETTINGS},
               stab=train_kwargs.get("stab_weight", 0) > 0, fp=train_kwargs.get("fp_weight", 0) > 0,
               jac=train_kwargs.get("jac_weight", 0) > 0)
    return json.dumps(key, sort_keys=True, default=repr)


def _run_jobs(jobs: list[dict]):
    """Train ``jobs`` (one ensemble's worth, or a single job) in this process: ``[(history,
    state_dict), ...]``. Several jobs are stacked and trained as one ensemble."""
    models = [build_model(job["model"], job["seed"], **job["model_kwargs"]) for job in jobs]
    data = DATASETS[jobs[0]["data"]]()
    if len(jobs) == 1:
        history = train(models[0], data, seed=jobs[0]["seed"], progress=False,
                        **jobs[0]["train_kwargs"])
        return [(history, {k: v.detach().cpu().clone() for k, v in models[0].state_dict().items()})]
    ensemble = ImplicitModel.stack(models)
    shared = {k: v for k, v in jobs[0]["train_kwargs"].items() if k not in MEMBER_TRAIN_SETTINGS}
    per_member = {name: [job["train_kwargs"].get(name, TRAIN_DEFAULTS[name]) for job in jobs]
                  for name in MEMBER_TRAIN_SETTINGS}
    histories = train(ensemble, data, seed=[job["seed"] for job in jobs], progress=False,
                      **shared, **per_member)
    return [(history, {k: v.detach().cpu().clone() for k, v in ensemble.member(e).state_dict().items()})
            for e, history in enumerate(histories)]


def _batches(jobs: list[dict], ensemble: bool, workers: int, max_members: int) -> list[list[int]]:
    """Indices of the jobs trained together, longest first: one job each without ensembling;
    otherwise the jobs of each :func:`ensemble_key`, sorted by theta and cut into
    ``max(ceil(n / max_members), min(workers, n))`` pieces, each cut moved to the nearest
    change of theta within a quarter of a piece (an ensemble iterates as long as its slowest
    member, and members of one theta converge alike; further, the pieces would be too uneven
    to share the workers)."""
    if not ensemble:
        return sorted(([i] for i in range(len(jobs))), key=lambda batch: -_cost([jobs[batch[0]]]))
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(ensemble_key(job), []).append(i)
    batches = []
    for indices in groups.values():
        indices.sort(key=lambda i: jobs[i]["model_kwargs"].get("theta", 0.0))
        pieces = max(math.ceil(len(indices) / max_members), min(workers, len(indices)))
        thetas = [jobs[i]["model_kwargs"].get("theta", 0.0) for i in indices]
        changes = [k for k in range(1, len(indices)) if thetas[k] != thetas[k - 1]]
        cuts, size = [], len(indices) / pieces
        for p in range(1, pieces):
            # a cut leaves pieces of at most max_members on both sides
            low = max((cuts or [0])[-1] + 1, len(indices) - max_members * (pieces - p))
            high = (cuts or [0])[-1] + max_members
            even = min(max(round(p * size), low), high)
            near = [k for k in changes if abs(k - even) <= size / 4 and low <= k <= high]
            cuts.append(min(near, key=lambda k: abs(k - even)) if near else even)
        batches += [[int(i) for i in indices[a:b]] for a, b in zip([0] + cuts, cuts + [len(indices)])]
    # the longest first, so that a long batch does not start last and run alone
    return sorted(batches, key=lambda batch: -_cost([jobs[i] for i in batch]))


@functools.cache
def _training_size(data: str) -> int:
    return DATASETS[data]().x_train.shape[0]


def _cost(batch: list[dict]) -> float:
    """A rough cost model of training ``batch`` together, to start the longest batches first:
    layer-steps (epochs x minibatches x layers) times the evaluations of F per layer (1
    explicit; implicit, a third of the iteration cap up to 30, doubled for Anderson's
    least-squares step and for R_fp's recorded iterates), each a fixed overhead plus arithmetic that grows
    with the samples in flight (members x minibatch x perturbation streams x width); the
    weights fit this 2-core machine's timings of the notebooks' jobs."""
    job = batch[0]
    train_kwargs, model_kwargs = job["train_kwargs"], job["model_kwargs"]
    n = _training_size(job["data"])
    minibatch = min(train_kwargs.get("batch_size") or n, n)
    streams = 1 + train_kwargs.get("stab_streams", 2) if train_kwargs.get("stab_weight", 0) > 0 else 1
    layer_steps = (train_kwargs.get("epochs", 1) * math.ceil(n / minibatch)
                   * model_kwargs.get("num_layers", 1))
    evaluations = 1.0
    if any(j["model_kwargs"].get("theta", 0.0) > 0 for j in batch):
        evaluations = (min(model_kwargs.get("max_iters", 50), 30) / 3
                       * (2 if model_kwargs.get("solver") == "anderson" else 1)
                       * (2 if train_kwargs.get("fp_weight", 0) > 0 else 1))
    return layer_steps * evaluations * (1 + 1e-4 * len(batch) * minibatch * streams
                                        * model_kwargs.get("dim", model_kwargs.get("width", 2)))


def _batch_key(jobs: list[dict]) -> str:
    return cache.key({"train_many": jobs})


def _load_batch(directory, entry: str, size: int):
    found = cache.load(directory, entry)
    if found is None:
        return None
    tables, tensors = found
    if set(tables) != {f"history_{e}" for e in range(size)} or len(tensors) != size:
        return None
    return [(tables[f"history_{e}"], tensors[f"state_{e}"]) for e in range(size)]


def _store_batch(directory, entry: str, outcome) -> None:
    cache.store(directory, entry, {f"history_{e}": h for e, (h, _) in enumerate(outcome)},
                {f"state_{e}": s for e, (_, s) in enumerate(outcome)})


def train_many(jobs: list[dict], workers: int = 1, desc: str = "training", *,
               ensemble: bool = True, max_members: int = 64, cache_dir=None,
               executor=None):
    """Train independent models, ``workers`` processes at a time (or on ``executor``).

    Each job is a dict with ``model`` (a key of ``MODEL_FACTORIES``), ``model_kwargs``,
    ``data`` (a key of ``DATASETS``), ``train_kwargs`` (for :func:`train`) and ``seed``
    (initialisation and training noise). With ``ensemble`` (default) jobs that differ only in
    seed, ``theta`` and regulariser weights and sizes are stacked into ensembles of at most
    ``max_members`` (cut into at least ``workers`` pieces) and trained as one (docs/design.md,
    section 5); each job gets what training it alone gives, to rounding: how jobs are stacked
    (``ensemble``, ``workers``, ``max_members``) moves results by rounding only, where it
    runs (here, local processes, a Dask cluster) not at all.

    ``cache_dir``: a folder of trained batches (:mod:`irn.paper.cache`), keyed by the jobs, the
    training sources and the versions; a batch found there is not trained again.
    ``executor``: any ``concurrent.futures.Executor`` to run the batches on (e.g.
    ``irn.paper.experiments.executor("tls://head:8786")``, a Dask cluster); default: local processes.
    Returns ``[(model, history), ...]`` in the order of ``jobs``; progress is shown per
    finished job.
    """
    require(isinstance(workers, int) and workers >= 1, f"workers must be an int >= 1, got {workers!r}")
    require(isinstance(max_members, int) and max_members >= 1,
            f"max_members must be an int >= 1, got {max_members!r}")
    for job in jobs:
        _check_job(job)
    batches = _batches(jobs, ensemble, workers, max_members)
    bar = tqdm(total=len(jobs), desc=desc, mininterval=0)
    outcomes = [None] * len(batches)
    keys = [_batch_key([jobs[i] for i in batch]) for batch in batches] if cache_dir else None
    if cache_dir:
        for b, batch in enumerate(batches):
            outcomes[b] = _load_batch(cache_dir, keys[b], len(batch))
            if outcomes[b] is not None:
                bar.update(len(batch))
    todo = [b for b, outcome in enumerate(outcomes) if outcome is None]

    def done(index, outcome):  # stored as it finishes: a later failure keeps it
        b = todo[index]
        outcomes[b] = outcome
        if cache_dir:
            _store_batch(cache_dir, keys[b], outcome)
        bar.update(len(batches[b]))

    run_all(_run_jobs, [[jobs[i] for i in batches[b]] for b in todo], workers, on_done=done,
            executor=executor)
    bar.close()
    results = [None] * len(jobs)
    for batch, outcome in zip(batches, outcomes):
        for i, result in zip(batch, outcome):
            results[i] = result
    models = []
    for job, (history, state) in zip(jobs, results):
        model = build_model(job["model"], job["seed"], **job["model_kwargs"])
        model.load_state_dict(state)
        models.append((model, history))
    return models


@dataclass(frozen=True)
class Job:
    """One training run: ``model`` (a key of :data:`MODEL_FACTORIES`) built from ``seed`` with
    ``network`` (its architecture: ``num_layers``, ``theta``, ``T``, ...) and ``solver`` (the
    blocks' settings, an :class:`irn.SolveConfig`; a dict of its fields is converted), trained
    on ``data`` (a key of :data:`DATASETS`) with ``training`` (keywords of
    :func:`irn.paper.training.train`; ``seed`` also seeds its minibatch order and
    perturbations). ``tags`` name the run in :func:`run`'s results (e.g. ``{"layout": "state",
    "theta": 0.5}``). Every setting is checked here, where the job is written: a misspelled key
    is a ``ValueError`` naming the allowed ones, a bad value one naming the setting."""

    model: str
    data: str
    seed: int
    network: dict = field(default_factory=dict)
    solver: SolveConfig = field(default_factory=SolveConfig)
    training: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    def __post_init__(self):
        choice("model", self.model, MODEL_FACTORIES)
        choice("data", self.data, DATASETS)
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool),
                f"seed must be an int, got {self.seed!r}")
        _known("network", self.network, NETWORK_SETTINGS[self.model])
        if not isinstance(self.solver, SolveConfig):
            require(isinstance(self.solver, dict),
                    f"solver must be an irn.SolveConfig or a dict of its fields, got {self.solver!r}")
            _known("solver", self.solver, SOLVER_SETTINGS)
            object.__setattr__(self, "solver", SolveConfig(**self.solver))
        _known("training", self.training, TRAIN_SETTINGS)
        require("epochs" in self.training, "training must set epochs (how long the run trains)")
        check_settings(**self.training)
        _check_network(self.model, json.dumps(self.network, sort_keys=True, default=repr))
        require("seed" not in self.tags, "tags must not include 'seed' (a column of its own)")

    @property
    def key(self) -> tuple:
        """``(*tags.values(), seed)``: how :func:`run` indexes the trained model."""
        return (*self.tags.values(), self.seed)

    def replace(self, **changes) -> "Job":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The job as :func:`train_many` takes it (the solver settings that differ from the
        defaults, so that a job's key names what was chosen)."""
        solver = {name: value for name, value in dataclasses.asdict(self.solver).items()
                  if value != SOLVER_DEFAULTS[name]}
        return dict(model=self.model, seed=self.seed, data=self.data,
                    model_kwargs=self.network | solver, train_kwargs=dict(self.training))


def sweep(model: str, data: str, seeds, tags: dict, loop=None, **settings) -> list[Job]:
    """The one way to declare a sweep: a :class:`Job` for every combination of the ``tags``'
    values and every seed, each with the fixed ``settings``; the jobs in the order of nested
    loops over ``loop`` (tag names and ``"seed"``, outermost first; default: the tags' order,
    then the seed).

    ``tags`` maps a tag's name to its values: a list, whose values are also the setting of
    that name where there is one (``theta=[0.0, 0.5]``), or a dict from each value to the
    settings it stands for (``depth={5: {"num_layers": 5}}``, ``variant={"R_fp": {...}}``).
    A setting goes to the job's network, solver or training by its name; a name that belongs
    to none is a ``ValueError`` naming the allowed ones."""
    def settings_of(name, value):
        if isinstance(tags[name], dict):
            return tags[name][value]
        return {name: value} if name in routes else {}

    routes = {name: "network" for name in NETWORK_SETTINGS[model]} \
        | {name: "solver" for name in SOLVER_SETTINGS} | {name: "training" for name in TRAIN_SETTINGS}
    loop = list(loop or tags)
    loop += [] if "seed" in loop else ["seed"]
    require(sorted(loop) == sorted([*tags, "seed"]),
            f"loop must order the tags {list(tags)} (and seed), got {loop}")
    axes = tags | {"seed": list(seeds)}
    jobs = []
    for values in itertools.product(*(list(axes[name]) for name in loop)):
        chosen = dict(zip(loop, values))
        seed = chosen.pop("seed")
        chosen = {name: chosen[name] for name in tags}
        fixed = dict(settings)
        for name, value in chosen.items():
            fixed |= settings_of(name, value)
        _known("sweep", fixed, routes)
        parts = {"network": {}, "solver": {}, "training": {}}
        for name, value in fixed.items():
            parts[routes[name]][name] = value
        jobs.append(Job(model, data, seed, tags=chosen, **parts))
    return jobs


def require_subset(grid, implicit: bool = False, **subsets) -> None:
    """Runs retrained beside a grid are compared with the grid's own: each parameter of
    ``subsets`` (name -> values) must hold values of ``grid`` (nonzero with ``implicit``), or a
    ``ValueError`` names it."""
    for name, values in subsets.items():
        require(set(values) <= set(grid) and not (implicit and 0.0 in values),
                f"{name} = {values} must be {'implicit ' if implicit else ''}values of {grid}")


def _known(what: str, settings: dict, allowed) -> None:
    require(isinstance(settings, dict), f"{what} must be a dict, got {settings!r}")
    unknown = sorted(set(settings) - set(allowed))
    require(not unknown, f"{what} settings {unknown} are not known; allowed: {sorted(allowed)}")


@functools.lru_cache(maxsize=256)
def _check_network(model: str, network: str) -> None:
    """A network's values checked by building it once (tiny networks; cached per setting); a
    setting the model needs and the job lacks is a ``ValueError`` too."""
    try:
        build_model(model, 0, **json.loads(network))
    except TypeError as err:  # a required argument missing
        raise ValueError(f"network settings of {model!r}: {err}") from None


def run(jobs: list[Job], *, workers: int = 1, desc: str = "training", cache_dir=None,
        dask_scheduler: str | None = None, **options):
    """Train ``jobs`` (:func:`train_many`, on the Dask scheduler at ``dask_scheduler`` if
    given) and return ``(models, histories)``: ``models[key]`` the trained model of each job,
    keyed by a named tuple of its tags and seed (which equals the plain tuple
    ``(*tags.values(), seed)``), and ``histories`` their :func:`irn.paper.training.train` histories
    in one frame with each job's tags and seed as columns. Keys must be unique."""
    jobs = list(jobs)
    keys = [job.key for job in jobs]
    require(len(set(keys)) == len(keys), "jobs must have distinct (tags, seed): "
                                         f"{sorted({k for k in keys if keys.count(k) > 1})}")
    with executor(dask_scheduler) as pool:
        results = train_many([job.as_dict() for job in jobs], workers, desc, cache_dir=cache_dir,
                             executor=pool, **options)
    models = {_key_type(tuple(job.tags))(*job.key): model for job, (model, _) in zip(jobs, results)}
    histories = pd.concat([history.assign(**job.tags, seed=job.seed)
                           for job, (_, history) in zip(jobs, results)], ignore_index=True)
    return models, histories


@functools.cache
def _key_type(tags: tuple[str, ...]):
    return collections.namedtuple("Key", [*tags, "seed"])


def select(models: dict, histories: pd.DataFrame, **tags):
    """The part of :func:`run`'s results whose ``tags`` have the given values, those tags
    dropped: the models keyed by their other tags and seed, the histories without those
    columns (renumbered). E.g. ``select(models, histories, network="paper")``."""
    chosen = {key: model for key, model in models.items()
              if all(getattr(key, name, _MISSING) == value for name, value in tags.items())}
    require(chosen, f"no job has tags {tags}")
    rekeyed = {}
    for key, model in chosen.items():
        rest = [name for name in key._fields if name not in tags]
        rekeyed[_key_type(tuple(rest[:-1]))(*(getattr(key, name) for name in rest))] = model
    rows = pd.Series(True, index=histories.index)
    for name, value in tags.items():
        rows &= histories[name] == value
    return rekeyed, histories[rows].drop(columns=list(tags)).reset_index(drop=True)


_MISSING = object()
