"""Collect the claims rows the notebooks saved (FIGURES/claims/*.csv) into FIGURES/claims.csv
and the values behind them (with their row's estimate, interval and verdict) into
FIGURES/claims_per_seed.csv (`make figures` and `make pilot` run it after the notebooks).

- `--half DIR`: the rows of the same runs trained half as long (DIR/claims/*.csv) add each
  row's verdict at half the budget (`verdict_half`); rows whose verdict differs there read
  budget-dependent.
- `--plan FILE`: each row's planned seed count from the analysis plan (`seeds_planned`).
- `--pilot DIR`: the pilot's table (DIR/claims.csv) compared with this one: where they agree,
  row by row in FIGURES/agreement.md, counted in the README.
- `--readme FILE`: the table rendered into it between the lines `<!-- claims:begin -->` and
  `<!-- claims:end -->`, the verdicts counted between `<!-- headline:begin -->` and
  `<!-- headline:end -->`, the agreement with the pilot between `<!-- agreement:begin -->` and
  `<!-- agreement:end -->`.

    python scripts/claims_table.py figures --half build/half/figures --plan params/plan.yaml \
        --pilot figures/pilot --readme README.md
"""

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from irn.paper import claims

BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
HEADLINE = "<!-- headline:begin -->", "<!-- headline:end -->"
AGREEMENT = "<!-- agreement:begin -->", "<!-- agreement:end -->"
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


LABELS = ("pilot", "confirmation")


def side_by_side(rows) -> str:
    """:func:`irn.paper.claims.compare`'s rows in Markdown, changed verdicts marked."""
    lines = [f"| claim | setup | {LABELS[0]} | verdict | {LABELS[1]} | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows.itertuples(index=False):
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]}"
                     + (" (changed)" if r.changed else "") + " |")
    return "\n".join(lines) + "\n"


def render(text: str, markers: tuple[str, str], body: str, readme: str) -> str:
    """``text`` with ``body`` between the lines ``markers`` (each must occur once, in order)."""
    begin, end = markers
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        sys.exit(f"error: {readme} must hold one line {begin} followed by one line {end}")
    head, rest = text.split(begin)
    return f"{head}{begin}\n{body}{end}{rest.split(end)[1]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figures")
    parser.add_argument("--half")
    parser.add_argument("--plan")
    parser.add_argument("--pilot")
    parser.add_argument("--readme")
    args = parser.parse_args(argv)
    figures = Path(args.figures)
    table = claims.table(figures)
    if args.half:
        table = claims.with_half_budget(table, claims.table(args.half))
    if args.plan:
        table = claims.with_plan(table, yaml.safe_load(Path(args.plan).read_text()))
    table.to_csv(figures / "claims.csv", index=False, float_format="%.6g")
    keys, columns = ["claim", "setup"], ["estimate", "bound", "p", "p_holm", "seeds", "verdict"]
    claims.table(figures, per_seed_values=True).merge(table[keys + columns], on=keys).to_csv(
        figures / "claims_per_seed.csv", index=False, float_format="%.6g")
    agreement = None
    if args.pilot:
        pilot = pd.read_csv(Path(args.pilot) / "claims.csv", dtype={"bound": str, "excludes": str})
        agreement = claims.agreement(pilot, table, LABELS)
        (figures / "agreement.md").write_text(
            "# The pilot (seeds 0-9) and the confirmation (the plan's seeds), row by row\n\n"
            + agreement + "\n" + side_by_side(claims.compare(pilot, table, LABELS)))
    if args.readme:
        text = render(Path(args.readme).read_text(), (BEGIN, END),
                      claims.markdown(table, figures.as_posix()), args.readme)
        text = render(text, HEADLINE, headline(table), args.readme)
        if agreement is not None:
            text = render(text, AGREEMENT, agreement, args.readme)
        Path(args.readme).write_text(text)
    print(f"[claims] {len(table)} rows: {figures / 'claims.csv'}"
          + (f", {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
