"""Run independent tasks in this process, in ``workers`` spawned processes (one core each), or
on any ``concurrent.futures.Executor`` (a Dask cluster's, see :func:`executor`)."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Callable

import torch


def run_all(fn: Callable, tasks: list, workers: int = 1, on_done: Callable | None = None,
            executor: Executor | None = None) -> list:
    """``[fn(task) for task in tasks]``, in order: on ``executor`` if given, else with
    ``workers > 1`` in that many spawned processes (fork is unsafe once torch has started
    threads), else here. Every task runs with one torch thread wherever it runs, so its result
    does not depend on the place. ``on_done(index, result)`` is called as each task finishes
    (to keep what is done when a later task fails)."""
    results = [None] * len(tasks)
    if executor is None and (workers == 1 or len(tasks) <= 1):
        for i, task in enumerate(tasks):
            results[i] = fn(task)
            if on_done:
                on_done(i, results[i])
        return results
    if executor is not None:
        return _collect(executor, fn, tasks, results, on_done)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
        return _collect(pool, fn, tasks, results, on_done)


def _collect(pool, fn, tasks, results, on_done):
    futures = {pool.submit(_one_thread, fn, pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)): i
               for i, task in enumerate(tasks)}
    for future in as_completed(futures):
        results[futures[future]] = pickle.loads(future.result())
        if on_done:
            on_done(futures[future], results[futures[future]])
    return results


def _one_thread(fn, task: bytes) -> bytes:
    """``fn(task)`` on one torch thread. Tasks and results travel pickled by the standard
    pickler: the process pool's would send every tensor through a file descriptor of its own,
    and the weights of many deep models (a 64-member batch of 100-layer networks: 13,000
    tensors; 400 trained models sent to be measured: 80,000) exceed the limit on open files."""
    torch.set_num_threads(1)  # one task per core
    return pickle.dumps(fn(pickle.loads(task)), protocol=pickle.HIGHEST_PROTOCOL)


@contextmanager
def executor(address: str | None):
    """The executor of the Dask scheduler at ``address`` (``tcp://127.0.0.1:8786`` on one
    machine, ``tls://head:8786`` across machines, credentials from dask's TLS configuration:
    see the README), through
    ``distributed.Client(address).get_executor()``; ``None`` or ``""`` yields None (local
    processes). The client is closed on exit."""
    if not address:
        yield None
        return
    try:
        from distributed import Client
    except ImportError as err:  # an optional dependency of sweeps on a cluster
        raise ImportError("a Dask scheduler needs the 'distributed' package "
                          "(pip install distributed; `make` installs it)") from err
    with Client(address) as client:
        yield client.get_executor()
