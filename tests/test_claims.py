"""The claims table: bootstrap intervals, verdicts and the per-seed quantities of each claim."""

import numpy as np
import pandas as pd
import pytest

from irn import claims


def test_bootstrap_interval_matches_the_normal_approximation_for_many_seeds():
    values = np.random.default_rng(1).normal(2.0, 3.0, size=400)
    mean, low, high = claims.bootstrap_interval(values)
    half = 1.96 * values.std() / np.sqrt(len(values))  # independent reference
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(mean - half, rel=0.1 * half / abs(mean))
    assert high - low == pytest.approx(2 * half, rel=0.05)


def test_bootstrap_interval_is_deterministic_and_degenerate_for_constant_values():
    values = [0.3, -0.1, 0.7, 0.2, 0.0, 0.5, -0.4, 0.9, 0.1, 0.6]
    assert claims.bootstrap_interval(values) == claims.bootstrap_interval(values)
    assert claims.bootstrap_interval(values) != claims.bootstrap_interval(values, seed=1)
    assert claims.bootstrap_interval([1.5] * 10) == (1.5, 1.5, 1.5)
    for bad in ([], [1.0, np.nan], [[1.0]]):
        with pytest.raises(ValueError, match="values"):
            claims.bootstrap_interval(bad)


@pytest.mark.parametrize("low, high, side, threshold, expected", [
    (-2, -1, "<", 0, "holds"), (1, 2, "<", 0, "contradicted"), (-1, 1, "<", 0, "inconclusive"),
    (1, 2, ">", 0, "holds"), (-2, -1, ">", 0, "contradicted"), (0, 0, ">", 0, "inconclusive"),
    (0.95, 1.0, ">", 0.9, "holds"), (0.0, 0.5, ">", 0.9, "contradicted")])
def test_verdict(low, high, side, threshold, expected):
    assert claims.verdict(low, high, side, threshold) == expected


def test_row_leaves_out_nan_seeds_and_names_bad_claims():
    values = [-1.0, -2.0, np.nan, -1.5] + [-1.5] * (claims.MIN_SEEDS - 3)
    r = claims.row("1a", "state", values, not_converged=2)
    assert r["seeds"] == claims.MIN_SEEDS and r["estimate"] == pytest.approx(-1.5)
    assert r["verdict"] == "holds" and r["not_converged"] == 2 and r["figure"] == "figure4_losses"
    assert claims.row("1a", "state", [np.nan])["verdict"] == "inconclusive"
    # too few seeds for a verdict: the estimate is given, the verdict withheld
    few = claims.row("1a", "state", [-1.0, -2.0])
    assert few["estimate"] == -1.5 and few["high"] < 0 and few["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="claim must be one of"):
        claims.row("99", "state", [1.0])


def _histories(train, val=None, converged=True, epochs=3, layers=2):
    """A synthetic long history frame: final losses ``train[(depth, theta, seed)]``."""
    rows = []
    for (depth, theta, seed), loss in train.items():
        for epoch in range(1, epochs + 1):
            row = dict(epoch=epoch, depth=depth, theta=theta, seed=seed, train_loss=loss,
                       val_loss=(val or train)[depth, theta, seed],
                       converged=converged if isinstance(converged, bool)
                       else converged[depth, theta, seed])
            for l in range(layers):
                row[f"forward_iterations_{l}"] = 10 * theta
                row[f"backward_iterations_{l}"] = 5 * theta
                row[f"grad_{l}"] = 1e-3 if theta == 0 else 1e-1
            rows.append(row)
    return pd.DataFrame(rows)


def test_example_1_rows_on_a_case_with_known_answers():
    seeds, thetas = range(10), (0.0, 0.5, 1.0)
    # L = 5: the explicit model 10x better on training than the best implicit one (which is
    # theta = 0.5 at 1e-2), and on validation 100x worse than the median implicit one
    train = {(5, t, s): {0.0: 1e-3, 0.5: 1e-2, 1.0: 1e-1}[t] for t in thetas for s in seeds}
    val = {(5, t, s): {0.0: 1.0, 0.5: 1e-2, 1.0: 1e-1}[t] for t in thetas for s in seeds}
    # L = 20: the explicit model stuck (loss 1 against 1e-2), gradients 100x smaller
    train |= {(20, t, s): 1.0 if t == 0 else 1e-2 for t in thetas for s in seeds}
    val |= {(20, t, s): 1.0 for t in thetas for s in seeds}
    converged = {key: not (key[0] == 5 and key[1] == 1.0 and key[2] < 4) for key in train}
    histories = _histories(train, val, converged)
    gains = pd.Series({(5, t, s): {0.0: 1.0, 0.5: -0.5, 1.0: -0.2}[t] for t in thetas for s in seeds})
    gains.index.names = ["depth", "theta", "seed"]
    regularized = _histories({(5, 0.5, s): 1e-2 * 10 ** (0.05 * (s % 2)) for s in seeds})
    regularized[[f"forward_iterations_{l}" for l in range(2)]] = 3.0

    rows = {r["claim"] + r["setup"]: r for r in claims.function_approximation_rows(
        histories, "toy", shallow=5, deep=20, gains=gains, regularized=regularized)}
    r = rows["1atoy"]
    assert r["estimate"] == pytest.approx(-1.0) and r["verdict"] == "holds"
    assert r["not_converged"] == 4  # theta = 1, seeds 0-3
    r = rows["1btoy"]  # median of log10 (1e-2, 1e-1) is -1.5; explicit 0
    assert r["estimate"] == pytest.approx(1.5) and r["verdict"] == "holds"
    assert rows["2toy"]["estimate"] == pytest.approx(1.2) and rows["2toy"]["verdict"] == "holds"
    assert rows["3atoy"]["estimate"] == pytest.approx(2.0) and rows["3atoy"]["verdict"] == "holds"
    assert rows["3btoy"]["estimate"] == pytest.approx(-2.0) and rows["3btoy"]["verdict"] == "holds"
    # convergence: at L = 5 seeds 0-3 have one of two implicit models unconverged
    r = rows["4toy, L = 5"]
    assert r["estimate"] == pytest.approx(0.8) and r["verdict"] == "inconclusive"
    assert rows["4toy, L = 20"]["estimate"] == 1.0 and rows["4toy, L = 20"]["verdict"] == "holds"
    r = rows["5atoy, R_fp at L = 5, theta in [0.5]"]  # 3 iterations against 10 * 0.5
    assert r["estimate"] == pytest.approx(-2.0) and r["verdict"] == "holds"
    r = rows["5btoy, R_fp at L = 5, theta in [0.5]"]  # odd seeds 0.05 decades worse: below the 0.1 margin
    assert r["estimate"] == pytest.approx(0.025) and r["verdict"] == "holds"


def test_example_1_rows_contradict_the_opposite_case():
    seeds = range(10)
    train = {(5, t, s): {0.0: 1e-1, 0.5: 1e-3}[t] * (1 + 0.1 * s) for t in (0.0, 0.5) for s in seeds}
    rows = claims.function_approximation_rows(_histories(train), "toy", shallow=5, deep=20)
    first = rows[0]
    assert first["claim"] == "1a" and first["estimate"] == pytest.approx(2.0)
    assert first["verdict"] == "contradicted"
    assert [r["claim"] for r in rows] == ["1a", "1b", "4"]  # no deep models: no claim 3


def test_classification_and_robustness_rows():
    rng = np.random.default_rng(0)
    results = pd.DataFrame([dict(variant=v, seed=s, val_accuracy=0.8 + (0.05 if v != "none" else 0)
                                 + 0.01 * rng.standard_normal(), pgd_accuracy=0.5,
                                 converged=True, trained=s != 3)
                            for v in ("none", "sigma 0.1") for s in range(10)])
    a, b = claims.classification_rows(results, "roll")
    assert a["claim"] == "6a" and a["setup"] == "roll, sigma 0.1" and a["verdict"] == "holds"
    assert 3 < a["estimate"] < 7
    assert b["claim"] == "6b" and b["estimate"] == 0 and b["verdict"] == "inconclusive"
    assert (a["trained"], a["runs"]) == (18, 20)
    summary = pd.DataFrame([dict(theta=t, regularizer=r, seed=s, growth=1.0 - 0.1 * t,
                                 pgd=60.0 + (10 if r == "R_stab" else 0) - 5 * t,
                                 converged=not (t == 1.0 and s == 0), trained=True)
                            for t in (0.0, 1.0) for r in ("none", "R_stab") for s in range(10)])
    growth, pgd, stab = claims.robustness_rows(summary, "spirals")
    assert growth["estimate"] == pytest.approx(-0.1) and growth["verdict"] == "holds"
    assert pgd["estimate"] == pytest.approx(-5.0) and pgd["verdict"] == "contradicted"
    assert pgd["not_converged"] == 1 and (pgd["trained"], pgd["runs"]) == (20, 20)
    assert stab["estimate"] == pytest.approx(10.0) and stab["verdict"] == "holds"


def test_saved_rows_make_the_table_and_its_markdown(tmp_path):
    n = claims.MIN_SEEDS
    claims.save([claims.row("6a", "b", [1.0, 2.0] * n)], "03_b", tmp_path)
    claims.save([claims.row("1a", "a", [-1.0, -2.0] * n)], "02_a", tmp_path)
    table = claims.table(tmp_path)
    assert list(table.columns) == claims.COLUMNS and list(table.claim) == ["1a", "6a"]
    text = claims.markdown(table)
    assert "(figures/figure4_losses.png)" in text and "**holds**" in text
    assert text.count("\n") == 4
    assert "-1.5 [" in claims.show(table)
    with pytest.raises(ValueError, match="claims"):
        claims.table(tmp_path / "empty")


def test_compare_puts_two_tables_side_by_side_and_flags_changed_verdicts():
    def table(rows):
        return pd.DataFrame([dict(zip(("claim", "setup", "estimate", "low", "high", "verdict"), r))
                             for r in rows])

    short = table([("1a", "state", 0.1, -0.1, 0.3, "inconclusive"),
                   ("2", "state", -0.5, -0.8, -0.2, "contradicted"),
                   ("7a", "digits", 1.0, 0.5, 1.5, "contradicted")])   # only in the first
    long = table([("2", "state", -0.6, -0.9, -0.3, "contradicted"),
                  ("1a", "state", -0.4, -0.6, -0.2, "holds")])
    out = claims.compare(short, long, ("short", "long"))
    assert list(out.columns) == ["claim", "setup", "short", "verdict short", "long",
                                 "verdict long", "changed"]
    assert out[["claim", "changed"]].values.tolist() == [["1a", True], ["2", False]]
    assert out.loc[0, "short"] == "+0.1 [-0.1, +0.3]" and out.loc[0, "long"] == "-0.4 [-0.6, -0.2]"
    with pytest.raises(ValueError, match="labels must be two different names"):
        claims.compare(short, long, ("a", "a"))
    with pytest.raises(ValueError, match="second: \\(claim, setup\\) must identify a row"):
        claims.compare(short, pd.concat([long, long]), ("first", "second"))


def test_loss_change_and_settled_runs():
    # a loss falling 10% per epoch has not settled; one that is flat over its last 10% has
    epochs = np.arange(100)
    falling = pd.DataFrame(dict(epoch=epochs, train_loss=0.9 ** epochs, depth=5, theta=0.0, seed=0))
    flat = pd.DataFrame(dict(epoch=epochs, train_loss=np.r_[np.linspace(2, 1, 90), np.ones(10)],
                             depth=5, theta=0.0, seed=1))
    assert claims.loss_change(falling) == pytest.approx(1 - 0.9 ** 10)
    assert claims.loss_change(flat) == pytest.approx(abs(1 - np.linspace(2, 1, 90)[-1]) / np.linspace(2, 1, 90)[-1])
    assert claims.loss_change(flat.assign(train_loss=1.0)) == 0
    done = claims.settled(pd.concat([falling, flat]))
    assert list(done) == [False, True]


def test_budget_dependent_rows_in_the_markdown():
    n = claims.MIN_SEEDS
    full = claims.frame([claims.row("1a", "a", [-1.0, -2.0] * n), claims.row("6a", "b", [1.0, 2.0] * n)])
    half = claims.frame([claims.row("1a", "a", [-1.0, 1.0] * n), claims.row("6a", "b", [1.0, 3.0] * n)])
    merged = claims.with_half_budget(full, half)
    assert list(merged.verdict_half) == ["inconclusive", "holds"]
    text = claims.markdown(merged)
    assert "**budget-dependent** (holds; inconclusive at half the budget)" in text
    assert text.count("budget-dependent") == 1
