"""Run independent tasks in this process or in ``workers`` spawned processes (one core each)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable

import torch


def run_all(fn: Callable, tasks: list, workers: int = 1, on_done: Callable | None = None) -> list:
    """``[fn(task) for task in tasks]``, in order; with ``workers > 1`` in that many spawned
    processes (fork is unsafe once torch has started threads), longest tasks first if the
    caller sorted them so. ``on_done(index)`` is called as each task finishes (progress)."""
    results = [None] * len(tasks)
    if workers == 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            results[i] = fn(task)
            if on_done:
                on_done(i)
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
        futures = {pool.submit(_one_thread, fn, task): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if on_done:
                on_done(futures[future])
    return results


def _one_thread(fn, task):
    torch.set_num_threads(1)  # one process per core
    return fn(task)
