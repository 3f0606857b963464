"""Collect the claims rows the notebooks saved (FIGURES/claims/*.csv) into FIGURES/claims.csv,
the values behind them (with their row's estimate, interval and verdict) into
FIGURES/claims_per_seed.csv and, if README is given, render them into it between the lines `<!-- claims:begin -->` and
`<!-- claims:end -->`, and the verdicts counted between `<!-- headline:begin -->` and
`<!-- headline:end -->` (`make figures` runs it after the notebooks). With `--half DIR`, the
rows of the same runs trained half as long (DIR/claims/*.csv, the `half` profile) add each
row's verdict at half the budget (`verdict_half`); the README then marks rows whose verdict
differs there as budget-dependent.

    python scripts/claims_table.py figures README.md --half build/half/figures
"""

import sys
from pathlib import Path

from irn.paper import claims

BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
HEADLINE = "<!-- headline:begin -->", "<!-- headline:end -->"
VERDICTS = {"holds": "hold", "contradicted": "contradicted", "equivalent": "equivalent",
            "inconclusive": "inconclusive"}  # a verdict, and how a count of rows reads it


def headline(table) -> str:
    """The verdicts counted, for the README's first screen."""
    counts = table["verdict"].value_counts()
    parts = ", ".join(f"**{counts.get(v, 0)} {word}**" for v, word in VERDICTS.items())
    line = f"{len(table)} rows at {int(table['seeds'].max())} seeds: {parts}"
    if "verdict_half" in table:
        moved = table[table["verdict"] != table["verdict_half"]]["verdict"].value_counts()
        which = ", ".join(f"{moved[v]} of the {v}" for v in VERDICTS if moved.get(v, 0))
        line += (f"; {int(moved.sum())} of these rows ({which}) read otherwise when the same "
                 f"runs train half as long, and show as **budget-dependent** in the table")
    return line + ".\n"


def render(text: str, markers: tuple[str, str], body: str, readme: str) -> str:
    """``text`` with ``body`` between the lines ``markers`` (each must occur once, in order)."""
    begin, end = markers
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        sys.exit(f"error: {readme} must hold one line {begin} followed by one line {end}")
    head, rest = text.split(begin)
    return f"{head}{begin}\n{body}{end}{rest.split(end)[1]}"


def main(figures: str, readme: str | None = None, *rest: str) -> int:
    table = claims.table(figures)
    if rest:
        if len(rest) != 2 or rest[0] != "--half":
            sys.exit("usage: claims_table.py FIGURES [README] [--half DIR]")
        table = claims.with_half_budget(table, claims.table(rest[1]))
    out = Path(figures) / "claims.csv"
    table.to_csv(out, index=False, float_format="%.6g")
    keys, columns = ["claim", "setup"], ["estimate", "bound", "p", "p_holm", "seeds", "verdict"]
    claims.table(figures, per_seed_values=True).merge(table[keys + columns], on=keys).to_csv(
        Path(figures) / "claims_per_seed.csv", index=False, float_format="%.6g")
    if readme is None:
        print(f"[claims] {len(table)} rows: {out}")
        return 0
    text = render(Path(readme).read_text(), (BEGIN, END),
                  claims.markdown(table, Path(figures).as_posix()), readme)
    Path(readme).write_text(render(text, HEADLINE, headline(table), readme))
    print(f"[claims] {len(table)} rows: {out}, {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
