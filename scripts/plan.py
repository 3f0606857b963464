"""Write the analysis plan (`irn.paper.plan`) from the pilot's figures folder, once: the plan
is then frozen, since the confirmatory seeds derive from its bytes (`make plan`).

    python scripts/plan.py figures/pilot params/plan.yaml
"""

import hashlib
import sys
from pathlib import Path

import yaml

from irn.paper import plan

HEADER = """\
# The analysis plan, frozen before the confirmatory run (docs/design.md, section 7). Written
# once by `make plan` (scripts/plan.py, irn/paper/plan.py) from the pilot (params/pilot.yaml,
# seeds 0-9, figures/pilot/). Do not edit: the confirmatory seeds are drawn from this file's
# SHA-256 (irn.paper.plan.seeds; params/paper.yaml and params/half.yaml train them).
#
# Per family (one quoted sentence) its measure, test, side, threshold and margin (with its
# reason, fixed before this count), the family's size m and Bonferroni level alpha / m, and
# per row the seeds its test needs for {power:.0%} power against the margin at that level,
# simulated from the pilot's per-seed spread ({draws} resampled data sets per count): more
# than {max_seeds} reads ">{max_seeds}" and the row is listed as undecidable at this scale.
# A family trains the largest count of its planned rows ({max_seeds} where none is decidable
# below it); each notebook trains the largest count of the families it feeds, on every run.
"""


def main(pilot: str, out: str) -> int:
    path = Path(out)
    if path.exists():
        sys.exit(f"error: {out} exists: the plan is frozen once written (the confirmatory "
                 f"seeds derive from its bytes); remove it only to plan a new confirmation")
    built = plan.build(Path(pilot))
    per_seed = Path(pilot) / "claims_per_seed.csv"
    built = dict(pilot=dict(profile="params/pilot.yaml", folder=Path(pilot).as_posix(),
                            claims_per_seed_sha256=hashlib.sha256(per_seed.read_bytes()).hexdigest()),
                 **built)
    text = HEADER.format(power=plan.POWER, draws=built["draws"], max_seeds=built["max_seeds"])
    path.write_text(text + yaml.safe_dump(built, sort_keys=False, width=100, allow_unicode=True))
    print(f"[plan] {out}: seeds per notebook {built['notebooks']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
