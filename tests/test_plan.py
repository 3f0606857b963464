"""The analysis plan: seed counts with the power they promise, seeds that cannot exist
before the plan, and the frozen plan still the one its pilot gives."""

import hashlib
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from irn.paper import claims, plan

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "params" / "plan.yaml"


def test_seeds_derive_from_the_plans_bytes_and_avoid_the_pilots(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("notebooks: {a: 5}\n")
    first = plan.seeds(path, claims.MAX_SEEDS)
    assert plan.seeds(path, 5) == first[:5]               # a notebook of n takes the first n
    assert len(set(first)) == claims.MAX_SEEDS
    assert all(plan.FIRST_SEED <= s < plan.LAST_SEED for s in first)   # none of 0-9
    path.write_text("notebooks: {a: 5}\n ")                # one byte more: other seeds
    assert not set(plan.seeds(path, 5)) & set(first[:5])
    with pytest.raises(ValueError, match="count must be in 1..50"):
        plan.seeds(path, 51)


def test_a_planned_count_has_the_power_it_promises_and_one_less_has_not():
    """Normal per-seed values: the count matches the normal-theory sample size of the
    signed-rank test, ``((z_(1-a) + z_0.8) s / margin)^2 / (3 / pi)``, to within 15%, and the
    power simulated afresh from the same distribution is at least 80% there."""
    spec, alpha = claims.CLAIMS["3b"], 0.05 / 10         # directional "<", margin 0.1 decades
    margin = claims.MARGINS[spec.margin][0]
    values = np.random.default_rng(0).normal(0.3, 0.15, 400)  # centre: moved to -margin
    n = plan.seeds_for(spec, "<", values, alpha, draws=2000)
    normal = ((stats.norm.ppf(1 - alpha) + stats.norm.ppf(0.8)) * 0.15 / margin) ** 2 / (3 / math.pi)
    assert abs(n - normal) <= 0.15 * normal, (n, normal)
    assert plan.power(spec, "<", values, n, alpha, draws=2000) >= plan.POWER
    assert plan.power(spec, "<", values, n - 1, alpha, draws=2000) < plan.POWER
    rng = np.random.default_rng(1)
    fresh = np.mean([claims.statistics.signed_rank_p(rng.normal(-margin, 0.15, n), 0.0, "less")
                     <= alpha for _ in range(2000)])
    assert fresh >= 0.77, fresh  # 80% within the simulation's own error


def test_a_spread_beyond_the_scale_is_undecidable_and_shares_need_every_seed():
    spec = claims.CLAIMS["1a"]
    wide = np.random.default_rng(2).normal(0.0, 2.0, 10)
    assert plan.seeds_for(spec, "<", wide, 0.05 / 20, draws=200) is None
    share = claims.CLAIMS["4"]  # n of n converging seeds reject a share of 0.9: 0.9^n <= alpha
    assert plan.seeds_for(share, ">", [1.0] * 10, 0.05) == 29
    assert plan.seeds_for(share, ">", [1.0] * 10, 0.05 / 20) is None   # 57 > 50


def test_the_plan_of_a_pilot(tmp_path):
    """Families sized as the table adjusts them; a row without spread, or with fewer seeds
    than a verdict needs, not planned; a family with no decidable row trains the most seeds."""
    seeds = pd.Index(range(10), name="seed")
    rng = np.random.default_rng(3)
    rows = [claims.row("3b", "s", pd.Series(rng.normal(-0.3, 0.05, 10), index=seeds),
                       component=f"theta = {t}") for t in (0.5, 1)]
    rows += [claims.row("7a", "flat", pd.Series(np.zeros(10), index=seeds)),
             claims.row("7a", "few", pd.Series(rng.normal(size=5), index=seeds[:5])),
             claims.row("7b", "wide", pd.Series(rng.normal(0, 40, 10), index=seeds))]
    claims.save(rows[:2], "02_x", tmp_path)
    claims.save(rows[2:], "04_y", tmp_path)
    built = plan.build(tmp_path, draws=200)
    b = built["families"]["3b"]
    assert b["family_size"] == 3 and b["level"] == pytest.approx(0.05 / 3)   # 2 rows + every
    assert set(b["rows"]) == {"s, theta = 0.5", "s, theta = 1"} and b["seeds"] <= 10
    assert built["families"]["7a"]["not_planned"] == ["flat", "few"]
    assert built["families"]["7b"]["undecidable_at_this_scale"] == ["wide"]
    assert built["notebooks"] == {"02_x": b["seeds"], "04_y": claims.MAX_SEEDS}


def test_the_frozen_plan_is_the_committed_pilots():
    """params/plan.yaml was written from the pilot committed with it: the per-seed file of
    figures/pilot/ in the plan's own commit has the digest the plan records (a later `make
    pilot` may rewrite the file), and every row of the pilot's table that the plan names
    exists there."""
    frozen = yaml.safe_load(PLAN.read_text())
    pilot = ROOT / frozen["pilot"]["folder"]
    log = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "params/plan.yaml"],
                         cwd=ROOT, capture_output=True, text=True)
    if log.returncode or not log.stdout.split():
        pytest.skip("no git history here to find the plan's commit")
    shown = subprocess.run(["git", "show", f"{log.stdout.split()[-1]}:{frozen['pilot']['folder']}"
                            "/claims_per_seed.csv"], cwd=ROOT, capture_output=True, check=True)
    assert hashlib.sha256(shown.stdout).hexdigest() == frozen["pilot"]["claims_per_seed_sha256"]
    table = pd.read_csv(pilot / "claims.csv")
    named = {(c, s) for c, f in frozen["families"].items() for s in f["rows"]}
    assert named <= set(zip(table.claim.astype(str), table.setup))
    assert frozen["max_seeds"] == claims.MAX_SEEDS and frozen["power"] == plan.POWER
