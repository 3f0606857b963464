"""The cache of trained models (irn.paper.cache, train_many's cache_dir) and sweeps on any executor
(a real Dask LocalCluster): hits return identical results without training, misses are exact,
damaged entries are retrained, and where a job runs does not change its numbers."""

import json
import threading
import warnings

import pandas as pd
import pytest
import torch

from irn.paper import cache, experiments, robustness, training


def jobs(epochs=3, **extra):
    return [dict(model="spiral_classifier", seed=seed, data="two_spirals",
                 model_kwargs=dict(num_layers=2, theta=theta, on_nonconvergence="ignore"),
                 train_kwargs=dict(epochs=epochs, loss="cross_entropy") | extra)
            for seed, theta in ((0, 0.0), (1, 0.5), (2, 1.0))]


@pytest.fixture
def count_training(monkeypatch):
    """Counts the batches train_many trains (in this process: workers=1)."""
    calls = []
    original = experiments._run_jobs

    def counted(batch):
        calls.append(len(batch))
        return original(batch)

    monkeypatch.setattr(experiments, "_run_jobs", counted)
    return calls


def same(result_a, result_b):
    for (model_a, history_a), (model_b, history_b) in zip(result_a, result_b):
        pd.testing.assert_frame_equal(history_a, history_b, check_exact=True)
        for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
            assert torch.equal(a, b)


def test_a_hit_returns_identical_results_without_training(tmp_path, count_training):
    first = experiments.train_many(jobs(), cache_dir=tmp_path)
    assert count_training == [3]  # one ensemble trained
    second = experiments.train_many(jobs(), cache_dir=tmp_path)
    assert count_training == [3]  # nothing trained again
    same(first, second)
    same(first, experiments.train_many(jobs()))  # and the same as without a cache


def test_an_ensemble_of_more_than_ten_members_hits(tmp_path, count_training):
    many = [job | dict(seed=seed) for seed in range(4) for job in jobs()]  # one batch of 12
    first = experiments.train_many(many, cache_dir=tmp_path)
    same(first, experiments.train_many(many, cache_dir=tmp_path))
    assert count_training == [12]


def test_batches_finished_before_a_failure_stay_cached(tmp_path, monkeypatch):
    """A long sweep that fails in its last batch keeps what it trained: each batch is stored
    as it finishes, and the rerun trains only the failed one."""
    original, calls = experiments._run_jobs, []

    def second_fails(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("a worker died")
        return original(batch)

    monkeypatch.setattr(experiments, "_run_jobs", second_fails)
    two = jobs() + [job | dict(model_kwargs=job["model_kwargs"] | dict(num_layers=3))
                    for job in jobs()]  # two batches (depths differ)
    with pytest.raises(RuntimeError, match="a worker died"):
        experiments.train_many(two, cache_dir=tmp_path)
    experiments.train_many(two, cache_dir=tmp_path)
    assert calls == [3, 3, 3]   # the first batch was not trained again


def test_a_changed_setting_misses(tmp_path, count_training):
    experiments.train_many(jobs(), cache_dir=tmp_path)
    experiments.train_many(jobs(epochs=4), cache_dir=tmp_path)
    assert count_training == [3, 3]


def test_a_changed_training_source_misses_a_plotting_change_hits(tmp_path, monkeypatch):
    payload = {"train_many": jobs()}
    reference = cache.key(payload)
    sources = tmp_path / "irn"
    (sources / "paper").mkdir(parents=True)
    for path in [*cache.PACKAGE.glob("*.py"), *cache.PACKAGE.glob("paper/*.py"),
                 cache.PACKAGE / "auto_crossover.json"]:
        (sources / path.relative_to(cache.PACKAGE)).write_bytes(path.read_bytes())
    monkeypatch.setattr(cache, "PACKAGE", sources)
    assert cache.key(payload) == reference
    plotting = sources / "paper" / "plotting.py"
    plotting.write_text(plotting.read_text() + "\n# a colour\n")
    assert cache.key(payload) == reference
    # a changed crossover changes which path backend="auto" trains on
    for changed in ("solvers.py", "paper/training.py", "auto_crossover.json"):
        (sources / changed).write_text((sources / changed).read_text() + "\n# a change\n")
        assert cache.key(payload) != reference


def test_every_module_that_trains_is_in_the_key():
    """The whole core (a solver's driver, a linear solver, a records change all move training)
    and every harness module that training imports."""
    import ast

    core = {path.name for path in cache.PACKAGE.glob("*.py")}
    assert core <= set(cache.TRAINING_SOURCES)
    for name in ("experiments", "training"):
        tree = ast.parse((cache.PACKAGE / "paper" / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.level == 1 and node.module is None for alias in node.names}
        needed = {f"paper/{m}.py" for m in imported - {"cache", "parallel"}}
        assert needed <= set(cache.TRAINING_SOURCES), needed - set(cache.TRAINING_SOURCES)


def test_the_key_holds_the_backend_and_numba_version(monkeypatch):
    """A warm cache must not hand models trained on the compiled path to a run on the generic
    one (IRN_BACKEND=torch), nor those of another numba (LLVM rounds differently)."""
    payload = {"train_many": jobs()}
    monkeypatch.delenv("IRN_BACKEND", raising=False)
    reference = cache.key(payload)
    monkeypatch.setenv("IRN_BACKEND", "torch")
    assert cache.key(payload) != reference
    monkeypatch.delenv("IRN_BACKEND")
    assert cache.key(payload) == reference
    monkeypatch.setattr(cache, "_numba_version", lambda: "0.0.1")
    assert cache.key(payload) != reference


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "remove"])
def test_a_damaged_entry_is_reported_and_retrained(tmp_path, count_training, damage):
    first = experiments.train_many(jobs(), cache_dir=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    victim = sorted(entry.glob("*.pt"))[1]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "corrupt":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    with pytest.warns(cache.CacheWarning, match="unreadable"):
        second = experiments.train_many(jobs(), cache_dir=tmp_path)
    assert count_training == [3, 3]
    same(first, second)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry reads cleanly
        experiments.train_many(jobs(), cache_dir=tmp_path)
    assert count_training == [3, 3]


def test_two_writers_of_one_entry_leave_one_whole_entry(tmp_path):
    tables = {"history_0": pd.DataFrame({"loss": [1.0, 0.5]})}
    tensors = {"state_0": {"w": torch.arange(1000, dtype=torch.float64)}}
    threads = [threading.Thread(target=cache.store, args=(tmp_path, "entry", tables, tensors))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temporary folder left
    loaded_tables, loaded_tensors = cache.load(tmp_path, "entry")
    pd.testing.assert_frame_equal(loaded_tables["history_0"], tables["history_0"])
    assert torch.equal(loaded_tensors["state_0"]["w"], tensors["state_0"]["w"])


def test_loading_never_unpickles_objects(tmp_path):
    """A tensor file holding an arbitrary object is refused (weights_only), not executed."""
    cache.store(tmp_path, "entry", {}, {"state_0": {"w": torch.zeros(2)}})
    path = tmp_path / "entry" / "state_0.pt"
    torch.save({"w": torch.zeros(2), "x": threading.Lock}, path)  # not a plain tensor dict
    manifest = tmp_path / "entry" / "manifest.json"  # checksums updated: only the pickle is wrong
    manifest.write_text(json.dumps({"state_0.pt": cache._sha256(path)}))
    with pytest.warns(cache.CacheWarning):
        assert cache.load(tmp_path, "entry") is None


def test_robustness_measurements_are_cached(tmp_path):
    (model, _), = experiments.train_many(jobs()[:1])
    task = (model, experiments.DATASETS["two_spirals"](),
            dict(sigmas=[0.0, 0.1], epsilons=[0.0, 0.05], pgd_steps=2, repeats=2, seed=3))
    first = robustness.measure_many([task], cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    second = robustness.measure_many([task], cache_dir=tmp_path)
    pd.testing.assert_frame_equal(first[0][0], second[0][0], check_exact=True)
    assert (first[0][1] == second[0][1]).all() and first[0][2] == second[0][2]
    with torch.no_grad():
        model.readout.bias.add_(0.1)  # another model: another entry
    robustness.measure_many([task], cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield client


def test_a_sweep_on_a_dask_cluster_equals_the_local_one_bit_for_bit(dask_client):
    sweep = jobs(stab_weight=1.0, batch_size=32) + jobs(fp_weight=0.5)
    local = experiments.train_many(sweep, workers=2)
    remote = experiments.train_many(sweep, workers=2, executor=dask_client.get_executor())
    same(local, remote)


def test_executor_context_connects_to_a_scheduler(dask_client):
    with experiments.executor(dask_client.scheduler.address) as executor:
        assert executor.submit(sum, [1, 2]).result() == 3
    with experiments.executor(None) as executor:
        assert executor is None


_MANY_TENSORS = """
import resource, sys
import torch
from irn.paper.parallel import run_all

def many(weights):
    return {f"w{i}": w + 1 for i, w in enumerate(weights)}

if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    tasks = [[torch.full((3,), float(i)) for i in range(n)] for n in (2000, 2000, 10)]
    out = run_all(many, tasks, workers=2)
    assert [len(o) for o in out] == [2000, 2000, 10] and float(out[0]["w1999"][0]) == 2000.0
    print("ok")
"""


def test_results_of_many_tensors_come_back_under_a_low_limit_on_open_files(tmp_path):
    """Thousands of tensors go to a worker process (trained models to measure) and come back
    (a batch of many deep models): whole, with 256 open files allowed (the process pool's own
    pickler sends each tensor through a file descriptor, and a 50-seed sweep ran out of them)."""
    import subprocess
    import sys

    script = tmp_path / "many.py"
    script.write_text(_MANY_TENSORS)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
