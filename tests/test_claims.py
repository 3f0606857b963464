"""The claims table: rows, family-wise verdicts and the per-seed quantities of each claim."""

import numpy as np
import pandas as pd
import pytest

from irn.paper import claims


def _decided(rows):
    """Rows decided together (as a notebook saves them), keyed by claim + setup."""
    table = claims.frame(rows)
    return {r.claim + r.setup: r._asdict() for r in table.itertuples(index=False)}


@pytest.mark.parametrize("estimate, low, high, p_holm, claim, expected", [
    (-1.5, -2, -1, 0.01, "1a", "holds"), (1.5, 1, 2, 0.01, "1a", "contradicted"),
    (0.0, -1, 1, 0.5, "1a", "inconclusive"),
    (0.01, -0.05, 0.05, 0.5, "1a", "equivalent"),      # within the 0.1-decade margin
    (-0.02, -0.05, -0.01, 0.02, "1a", "holds"),        # a small effect, but a sure one
    (1.5, 1, 2, 0.2, "6a", "inconclusive"),            # not significant after Holm
    (0.95, 0.91, 1.0, 0.03, "4", "holds"), (0.3, 0.2, 0.4, 0.001, "4", "contradicted"),
    (0.9, 0.85, 0.95, 1.0, "4", "inconclusive")])      # no margin on shares: never equivalent
def test_verdict(estimate, low, high, p_holm, claim, expected):
    assert claims.verdict(estimate, low, high, p_holm, claim) == expected


def test_rows_leave_out_nan_seeds_and_are_decided_in_families():
    values = [-1.0, -2.0, np.nan, -1.5, -1.2, -1.7, -1.1, -1.9, -1.3, -1.6]
    r = claims.row("1a", "state", values, not_converged=2)
    assert r["seeds"] == 9 and r["verdict"] == "inconclusive"      # undecided until framed
    decided = _decided([r])["1astate"]
    assert decided["verdict"] == "holds" and decided["p"] == pytest.approx(2 / 2 ** 9)
    assert decided["p_holm"] == decided["p"] and decided["not_converged"] == 2
    assert decided["figure"] == "figure4_losses" and decided["seeds_needed"] >= 6
    # three rows of one claim share a Holm family: two rows significant alone (p = 0.043)
    # are not once the family is counted (0.043 x 2)
    family = [claims.row("6a", f"s{i}", np.arange(1.0, 11.0) - shift)
              for i, shift in enumerate((0.0, 3.0, 3.0))]
    table = claims.frame(family)
    assert list(table.p) == pytest.approx([2 / 1024, 44 / 1024, 44 / 1024])
    assert list(table.p_holm) == pytest.approx([6 / 1024, 88 / 1024, 88 / 1024])
    assert list(table.verdict) == ["holds", "inconclusive", "inconclusive"]
    # too few seeds for a verdict: the estimate is given, the verdict withheld
    few = _decided([claims.row("1a", "state", [-1.0, -2.0])])["1astate"]
    assert few["estimate"] == -1.5 and few["verdict"] == "inconclusive"
    assert np.isnan(few["p_holm"])
    assert _decided([claims.row("1a", "state", [np.nan])])["1astate"]["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="claim must be one of"):
        claims.row("99", "state", [1.0])


def test_share_rows_use_exact_binomial_bounds_with_runs_as_the_unit():
    runs = pd.Series(True, index=pd.MultiIndex.from_product([[0.5, 1.0], range(10)],
                                                            names=["theta", "seed"]))
    r = claims.share_row("4", "toy", runs)
    assert r["seeds"] == 10 and r["estimate"] == 1.0
    assert r["low"] == pytest.approx(0.025 ** (1 / 20))          # all 20 runs converged
    assert _decided([r])["4toy"]["verdict"] == "inconclusive"   # 20 of 20 cannot exclude 0.9
    assert _decided([claims.share_row("4", "toy", runs.iloc[:10] & False)])["4toy"]["verdict"] \
        == "contradicted"


def _histories(train, val=None, converged=True, epochs=3):
    """A synthetic long history frame: final losses ``train[(depth, theta, seed)]``; per layer
    ``l`` of ``depth``, iterations ``10 theta`` and a gradient that grows 100x from the first
    to the last layer for the explicit model, constant for the implicit ones."""
    rows = []
    for (depth, theta, seed), loss in train.items():
        for epoch in range(1, epochs + 1):
            row = dict(epoch=epoch, depth=depth, theta=theta, seed=seed, train_loss=loss,
                       val_loss=(val or train)[depth, theta, seed],
                       converged=converged if isinstance(converged, bool)
                       else converged[depth, theta, seed])
            for l in range(depth):
                row[f"forward_iterations_{l}"] = 10 * theta
                row[f"backward_iterations_{l}"] = 5 * theta
                row[f"grad_{l}"] = 1e-3 * 100 ** (l / (depth - 1)) if theta == 0 else 1e-1
            rows.append(row)
    return pd.DataFrame(rows)


def test_example_1_rows_on_a_case_with_known_answers():
    seeds, thetas = range(10), (0.0, 0.5, 1.0)
    # L = 5: the explicit model 10x better on training than the best implicit one (which is
    # theta = 0.5 at 1e-2), and on validation 100x worse than the second worst implicit one
    train = {(5, t, s): {0.0: 1e-3, 0.5: 1e-2, 1.0: 1e-1}[t] for t in thetas for s in seeds}
    val = {(5, t, s): {0.0: 1.0, 0.5: 1e-2, 1.0: 1e-1}[t] for t in thetas for s in seeds}
    # L = 20: the explicit model stuck (loss 1 against 1e-2, the implicit ones equal), its
    # first layer's gradient 100x smaller than its last layer's
    train |= {(20, t, s): 1.0 if t == 0 else 1e-2 for t in thetas for s in seeds}
    val |= {(20, t, s): 1.0 for t in thetas for s in seeds}
    converged = {key: not (key[0] == 5 and key[1] == 1.0 and key[2] < 4) for key in train}
    histories = _histories(train, val, converged)
    gains = pd.Series({(5, t, s): {0.0: 1.0, 0.5: -0.5, 1.0: -0.2}[t] for t in thetas for s in seeds})
    gains.index.names = ["depth", "theta", "seed"]
    regularized = _histories({(5, 0.5, s): 1e-2 * 10 ** (0.05 * (s % 2)) for s in seeds})
    regularized[[f"forward_iterations_{l}" for l in range(5)]] = 3.0

    rows = _decided(claims.function_approximation_rows(
        histories, "toy", shallow=5, deep=20, gains=gains, regularized=regularized))
    r = rows["1atoy"]
    assert r["estimate"] == pytest.approx(-1.0) and r["verdict"] == "holds"
    assert r["not_converged"] == 4  # theta = 1, seeds 0-3
    r = rows["1btoy"]  # second worst of log10 (1e-2, 1e-1) is -2; explicit 0
    assert r["estimate"] == pytest.approx(2.0) and r["verdict"] == "holds"
    for theta, gap in ((0.5, 1.5), (1.0, 1.2)):   # claim 2, every implicit network
        r = rows[f"2toy, theta = {theta:g}"]
        assert r["estimate"] == pytest.approx(gap) and r["verdict"] == "holds"
    assert rows["2toy, theta = 1"]["not_converged"] == 4
    assert "2-maxtoy" not in rows    # the earlier measure agrees: not kept
    assert rows["3atoy"]["estimate"] == pytest.approx(2.0) and rows["3atoy"]["verdict"] == "holds"
    assert rows["3btoy"]["estimate"] == pytest.approx(-2.0) and rows["3btoy"]["verdict"] == "holds"
    assert rows["3ctoy"]["estimate"] == pytest.approx(0.0) and rows["3ctoy"]["verdict"] == "equivalent"
    # convergence: at L = 5, 16 of 20 implicit runs; exact bounds cannot put 20 of 20 above 0.9
    r = rows["4toy, L = 5"]
    assert r["estimate"] == pytest.approx(0.8) and r["verdict"] == "inconclusive"
    assert r["low"] < 0.6 < 0.9 < r["high"]
    assert rows["4toy, L = 20"]["estimate"] == 1.0
    r = rows["5atoy, R_fp at L = 5, theta = 0.5"]  # 3 iterations against 10 * 0.5
    assert r["estimate"] == pytest.approx(-2.0) and r["verdict"] == "holds"
    r = rows["5btoy, R_fp at L = 5, theta = 0.5"]  # odd seeds 0.05 decades worse: within 0.1
    assert r["estimate"] == pytest.approx(0.025) and r["verdict"] == "equivalent"
    assert not any("converged pairs" in key for key in rows)   # the plain theta = 0.5 runs converged


def test_an_earlier_measure_is_kept_only_where_it_alters_the_verdict():
    seeds, thetas = range(10), (0.0, 0.5, 1.0)
    train = {(5, t, s): 1e-2 for t in thetas for s in seeds}
    # explicit minus theta = 0.5: -0.5 in every seed (contradicted); minus theta = 1: +-0.3
    # alternating (inconclusive); minus the largest: -0.5 everywhere (contradicted)
    gains = pd.Series({(5, t, s): {0.0: 0.0, 0.5: 0.5, 1.0: 0.3 * (-1) ** s}[t]
                       for t in thetas for s in seeds})
    gains.index.names = ["depth", "theta", "seed"]
    rows = _decided(claims.function_approximation_rows(_histories(train), "toy", shallow=5,
                                                       gains=gains))
    assert rows["2toy, theta = 0.5"]["verdict"] == "contradicted"
    assert rows["2toy, theta = 1"]["verdict"] == "inconclusive"
    kept = rows["2-maxtoy"]
    assert kept["estimate"] == pytest.approx(-0.5) and kept["verdict"] == "contradicted"


def test_fixed_point_rows_separate_unconverged_pairs():
    seeds = range(10)
    train = {(5, t, s): 1e-2 for t in (0.0, 1.0) for s in seeds}
    converged = {key: not (key[1] == 1.0 and key[2] < 3) for key in train}
    regularized = _histories({(5, 1.0, s): 1e-2 for s in seeds})
    rows = _decided(claims.function_approximation_rows(
        _histories(train, converged=converged), "toy", shallow=5, regularized=regularized))
    pairs = rows["5atoy, R_fp at L = 5, theta = 1, converged pairs (7)"]
    assert pairs["seeds"] == 7 and pairs["runs"] == 14 and pairs["not_converged"] == 0
    assert rows["5atoy, R_fp at L = 5, theta = 1"]["not_converged"] == 3


def test_example_1_rows_contradict_the_opposite_case():
    seeds = range(10)
    train = {(5, t, s): {0.0: 1e-1, 0.5: 1e-3}[t] * (1 + 0.1 * s) for t in (0.0, 0.5) for s in seeds}
    rows = claims.frame(claims.function_approximation_rows(_histories(train), "toy", shallow=5, deep=20))
    first = rows.iloc[0]
    assert first.claim == "1a" and first.estimate == pytest.approx(2.0)
    assert first.verdict == "contradicted"
    assert list(rows.claim) == ["1a", "1b", "4"]  # no deep models: no claim 3


def test_classification_and_robustness_rows():
    rng = np.random.default_rng(0)
    results = pd.DataFrame([dict(variant=v, seed=s, val_accuracy=0.8 + (0.05 if v != "none" else 0)
                                 + 0.01 * rng.standard_normal(), pgd_accuracy=0.5,
                                 converged=True, trained=s != 3)
                            for v in ("none", "sigma 0.1") for s in range(10)])
    a, b = _decided(claims.classification_rows(results, "roll")).values()
    assert a["claim"] == "6a" and a["setup"] == "roll, sigma 0.1" and a["verdict"] == "holds"
    assert 3 < a["estimate"] < 7
    # equal PGD accuracy in every seed: no difference, and none of a point either way
    assert b["claim"] == "6b" and b["estimate"] == 0 and b["verdict"] == "equivalent"
    assert (a["trained"], a["runs"]) == (18, 20)
    summary = pd.DataFrame([dict(theta=t, regularizer=r, seed=s, growth=1.0 - 0.1 * t,
                                 pgd=60.0 + (10 if r == "R_stab" else 0) - 5 * t + 0.1 * s,
                                 converged=not (t == 1.0 and s == 0), trained=True)
                            for t in (0.0, 1.0) for r in ("none", "R_stab") for s in range(10)])
    growth, pgd, stab0, stab1 = _decided(claims.robustness_rows(summary, "spirals")).values()
    assert growth["estimate"] == pytest.approx(-0.1) and growth["verdict"] == "holds"
    assert pgd["estimate"] == pytest.approx(-5.0) and pgd["verdict"] == "contradicted"
    assert pgd["not_converged"] == 1 and (pgd["trained"], pgd["runs"]) == (20, 20)
    for stab, theta in ((stab0, 0), (stab1, 1)):    # R_stab at every theta trained with it
        assert stab["setup"] == f"spirals, theta = {theta}"
        assert stab["estimate"] == pytest.approx(10.0) and stab["verdict"] == "holds"
    assert stab1["not_converged"] == 2


def test_saved_rows_make_the_table_its_per_seed_values_and_its_markdown(tmp_path):
    seeds = pd.Series(np.r_[1.0:11.0], index=pd.Index(range(10), name="seed"))
    claims.save([claims.row("6a", "b", seeds)], "03_b", tmp_path)
    claims.save([claims.row("1a", "a", -seeds), claims.row("5b", "c", seeds * 0)], "02_a", tmp_path)
    table = claims.table(tmp_path)
    assert list(table.columns) == claims.COLUMNS and list(table.claim) == ["1a", "5b", "6a"]
    assert list(table.verdict) == ["holds", "equivalent", "holds"]
    values = claims.table(tmp_path, per_seed_values=True)
    assert len(values) == 30 and values.seed.iloc[0] == 0
    assert values[values.claim == "1a"].value.tolist() == (-seeds).tolist()
    text = claims.markdown(table)
    assert "(figures/figure4_losses.png)" in text and "**holds**" in text
    assert '["explicit ResNet has the best' in text       # the paper's words, quoted
    assert "[R_fp costs no training loss]" in text        # our reading, not quoted
    assert text.count("\n") == 7   # header, rule, three rows, a blank line, the seeds needed
    assert "Seeds needed for 80% power" in text and "1a: 6 to 6 (0 of 1 rows" in text
    assert "-5.5 [" in claims.show(table)
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
    up = np.r_[1.0:11.0]
    full = claims.frame([claims.row("1a", "a", -up), claims.row("6a", "b", up)])
    half = claims.frame([claims.row("1a", "a", up - 5.5), claims.row("6a", "b", up + 1)])
    merged = claims.with_half_budget(full, half)
    assert list(merged.verdict_half) == ["inconclusive", "holds"]
    text = claims.markdown(merged)
    assert "**budget-dependent** (holds; inconclusive at half the budget)" in text
    assert text.count("budget-dependent") == 1
