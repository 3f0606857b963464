"""Jobs as values and run(): checked at construction, trained exactly as train_many trains their
dicts, returned keyed by their tags."""

import pandas as pd
import pytest

from irn.paper import experiments, training
from irn.paper.experiments import Job


def spiral_job(seed, theta, **training_settings):
    return Job("spiral_classifier", "two_spirals", seed,
               network=dict(num_layers=2, theta=theta),
               solver=dict(tol=1e-6, on_nonconvergence="ignore"),
               training=dict(epochs=3, loss="cross_entropy") | training_settings,
               tags=dict(theta=theta))


@pytest.mark.parametrize("change, name", [
    (dict(model="resnet"), "model"),
    (dict(data="mnist"), "data"),
    (dict(seed=1.5), "seed"),
    (dict(training=dict(epochs=3, learning_rate=0.1)), "learning_rate"),
    (dict(solver=dict(theta=0.5)), r"solver settings \['theta'\] are not known; allowed: .*'max_iters'"),
    (dict(solver=dict(max_iter=5)), r"solver settings \['max_iter'\] are not known; allowed: .*'max_iters'"),
    (dict(network=dict(num_layer=2)), r"network settings \['num_layer'\] are not known; allowed: .*'num_layers'"),
    (dict(training=dict(epochs=3, stab_weigth=1.0)), r"\['stab_weigth'\] are not known; allowed: .*'stab_weight'"),
    (dict(network=dict(num_layers=2, theta=1.5)), r"theta must be a number in \[0, 1\]"),
    (dict(network=dict(num_layers=0)), "num_layers"),
    (dict(solver=dict(tol=0)), "tol must be"),
    (dict(training=dict(epochs=0)), "epochs must be"),
    (dict(training=dict(epochs=3, loss="hinge")), "loss must be"),
    (dict(training=dict(epochs=3, stab_weight=-1.0)), "stab_weight must be >= 0"),
    (dict(training=dict(loss="cross_entropy")), "training must set epochs"),
    (dict(model="function_approximator", data="sine", network=dict(num_layers=2)),
     r"network settings of 'function_approximator': .*theta"),
    (dict(tags=dict(seed=0)), "seed"),
])
def test_a_bad_job_is_refused_at_construction(change, name):
    """Where the job is written (a notebook's cell), not in a worker: every key and value."""
    with pytest.raises(ValueError, match=name):
        spiral_job(0, 0.5).replace(**change)


def test_a_jobs_solver_settings_are_typed():
    import irn

    job = spiral_job(0, 0.5)
    assert job.solver == irn.SolveConfig(tol=1e-6, on_nonconvergence="ignore")
    assert job.as_dict()["model_kwargs"] == dict(num_layers=2, theta=0.5, tol=1e-6,
                                                 on_nonconvergence="ignore")
    assert job.replace(solver=irn.SolveConfig(max_iters=7)).solver.max_iters == 7


def test_run_returns_models_and_histories_keyed_by_tags_as_train_many_trains_them():
    jobs = [spiral_job(seed, theta) for seed in (0, 1) for theta in (0.0, 0.5)]
    models, histories = experiments.run(jobs, desc="test")
    assert list(models) == [(0.0, 0), (0.5, 0), (0.0, 1), (0.5, 1)]
    assert list(histories.columns[-2:]) == ["theta", "seed"]
    assert len(histories) == 4 * 3
    reference = experiments.train_many([job.as_dict() for job in jobs], desc="test")
    for job, (model, history) in zip(jobs, reference):
        mine = histories[(histories.theta == job.tags["theta"]) & (histories.seed == job.seed)]
        pd.testing.assert_frame_equal(mine.drop(columns=["theta", "seed"]).reset_index(drop=True),
                                      history, check_exact=True)
        for a, b in zip(models[job.key].state_dict().values(), model.state_dict().values()):
            assert a.equal(b)


def test_run_refuses_jobs_with_the_same_key():
    with pytest.raises(ValueError, match="distinct"):
        experiments.run([spiral_job(0, 0.5), spiral_job(0, 0.5, lr=0.1)])


def test_as_dict_is_the_job_train_many_takes():
    job = spiral_job(3, 1.0, stab_weight=1.0)
    assert job.as_dict() == dict(
        model="spiral_classifier", seed=3, data="two_spirals",
        model_kwargs=dict(num_layers=2, theta=1.0, tol=1e-6,
                          on_nonconvergence="ignore"),  # non-defaults
        train_kwargs=dict(epochs=3, loss="cross_entropy", stab_weight=1.0))


def test_select_keeps_the_jobs_with_given_tags_and_drops_those_tags():
    jobs = [spiral_job(seed, theta).replace(tags=dict(network=network, theta=theta))
            for network in ("ours", "paper") for seed in (0, 1) for theta in (0.0, 0.5)]
    models, histories = experiments.run(jobs, desc="test")
    assert models[("paper", 0.5, 1)] is models[jobs[-1].key]  # named keys equal plain tuples
    paper, paper_histories = experiments.select(models, histories, network="paper")
    assert list(paper) == [(0.0, 0), (0.5, 0), (0.0, 1), (0.5, 1)]
    assert [key.theta for key in paper] == [0.0, 0.5, 0.0, 0.5]
    assert paper[0.5, 1] is models["paper", 0.5, 1]
    assert list(paper_histories.columns[-2:]) == ["theta", "seed"] and "network" not in paper_histories
    assert len(paper_histories) == 4 * 3 and paper_histories.index.tolist() == list(range(12))
    with pytest.raises(ValueError, match="no job"):
        experiments.select(models, histories, network="theirs")


def test_building_a_model_leaves_the_callers_random_state_alone():
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = experiments.build_model("spiral_classifier", 7, num_layers=2)
    assert torch.equal(torch.rand(3), expected)
    second = experiments.build_model("spiral_classifier", 7, num_layers=2)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert a.equal(b)  # and the seed still decides the weights


def test_sweep_declares_every_combination_with_settings_routed_by_name():
    jobs = experiments.sweep(
        "spiral_classifier", "two_spirals", [0, 1], loop=["variant", "depth", "theta"],
        tags=dict(variant={"none": {}, "R_stab": dict(stab_weight=1.0)}, theta=[0.0, 0.5],
                  depth={2: dict(num_layers=2), 3: dict(num_layers=3)}),
        T=1.0, max_iters=7, epochs=3, loss="cross_entropy")
    assert len(jobs) == 16
    assert [(j.tags["variant"], j.tags["depth"], j.tags["theta"], j.seed) for j in jobs[:5]] == [
        ("none", 2, 0.0, 0), ("none", 2, 0.0, 1), ("none", 2, 0.5, 0), ("none", 2, 0.5, 1),
        ("none", 3, 0.0, 0)]
    last = jobs[-1]
    assert list(last.tags) == ["variant", "theta", "depth"]  # the tags' order, not the loop's
    assert last.network == dict(T=1.0, num_layers=3, theta=0.5)
    assert last.solver.max_iters == 7
    assert last.training == dict(epochs=3, loss="cross_entropy", stab_weight=1.0)
    seed_first = experiments.sweep("spiral_classifier", "two_spirals", [0, 1],
                                   loop=["seed", "theta"], tags=dict(theta=[0.0, 0.5]), epochs=1)
    assert [(j.seed, j.tags["theta"]) for j in seed_first] == [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5)]
    with pytest.raises(ValueError, match=r"sweep settings \['epoch'\] are not known"):
        experiments.sweep("spiral_classifier", "two_spirals", [0], tags=dict(theta=[0.0]), epoch=3)
    with pytest.raises(ValueError, match="loop must order the tags"):
        experiments.sweep("spiral_classifier", "two_spirals", [0], tags=dict(theta=[0.0]),
                          loop=["depth"], epochs=1)


def test_require_subset_names_the_parameter():
    experiments.require_subset([0.0, 0.5, 1.0], implicit=True, fp_thetas=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"fp_thetas = \[0.0, 0.5\] must be implicit values"):
        experiments.require_subset([0.0, 0.5], implicit=True, fp_thetas=[0.0, 0.5])
    with pytest.raises(ValueError, match=r"relu_depth = \[7\] must be values of \[5, 20\]"):
        experiments.require_subset([5, 20], relu_depth=[7])
