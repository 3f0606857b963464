"""Collect the claims rows the notebooks saved (FIGURES/claims/*.csv) into FIGURES/claims.csv,
the values behind them (with their row's estimate, interval and verdict) into
FIGURES/claims_per_seed.csv and, if README is given, render them into it between the lines `<!-- claims:begin -->` and
`<!-- claims:end -->` (`make figures` runs it after the notebooks). With `--half DIR`, the
rows of the same runs trained half as long (DIR/claims/*.csv, the `half` profile) add each
row's verdict at half the budget (`verdict_half`); the README then marks rows whose verdict
differs there as budget-dependent.

    python scripts/claims_table.py figures README.md --half build/half/figures
"""

import sys
from pathlib import Path

from irn.paper import claims

BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def main(figures: str, readme: str | None = None, *rest: str) -> int:
    table = claims.table(figures)
    if rest:
        if len(rest) != 2 or rest[0] != "--half":
            sys.exit("usage: claims_table.py FIGURES [README] [--half DIR]")
        table = claims.with_half_budget(table, claims.table(rest[1]))
    out = Path(figures) / "claims.csv"
    table.to_csv(out, index=False, float_format="%.6g")
    keys, columns = ["claim", "setup"], ["estimate", "low", "high", "p", "p_holm", "seeds", "verdict"]
    claims.table(figures, per_seed_values=True).merge(table[keys + columns], on=keys).to_csv(
        Path(figures) / "claims_per_seed.csv", index=False, float_format="%.6g")
    if readme is None:
        print(f"[claims] {len(table)} rows: {out}")
        return 0
    text = Path(readme).read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        sys.exit(f"error: {readme} must hold one line {BEGIN} followed by one line {END}")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    Path(readme).write_text(f"{head}{BEGIN}\n{claims.markdown(table, Path(figures).as_posix())}{END}{tail}")
    print(f"[claims] {len(table)} rows: {out}, {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
