"""Two claims tables side by side (`irn.paper.claims.compare`), as Markdown: `make long` compares
the `paper` profile's table with the `long` profile's (the same runs, longer training).

    python scripts/compare_claims.py figures/claims.csv build/long/figures/claims.csv \
        "paper profile" "long profile" figures/claims_long.md
"""

import sys
from pathlib import Path

import pandas as pd

from irn.paper import claims


def main(first: str, second: str, first_label: str, second_label: str, out: str) -> int:
    table = claims.compare(pd.read_csv(first), pd.read_csv(second), (first_label, second_label))
    lines = [f"| claim | setup | {first_label} | verdict | {second_label} | verdict |",
             "|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        mark = " (changed)" if r.changed else ""
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]}{mark} |")
    text = "\n".join(lines) + "\n"
    Path(out).write_text(text)
    print(text + f"[claims] {int(table.changed.sum())} of {len(table)} verdicts differ: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
