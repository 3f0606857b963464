"""Split a profile (params/<profile>.yaml, one section per notebook) into one file per
notebook, rewriting a file only when its content changes, so that make re-runs only the
notebooks whose parameters changed. A profile may start from another one
(`extends: paper.yaml`, a file beside it) and set only the parameters it changes, and may set
the seeds of every notebook that has some (`seeds:` a list, or an analysis plan's file name:
each notebook its planned count of the plan's seeds, `irn.paper.plan.seeds`).

    python scripts/split_params.py params/paper.yaml build/paper/params
"""

import sys
from pathlib import Path

import yaml

from irn.paper import plan


def load(profile) -> dict:
    """The profile's sections (notebook -> parameters), those of the profile it ``extends``
    updated parameter by parameter with its own, then its ``seeds`` set."""
    sections = yaml.safe_load(Path(profile).read_text()) or {}
    base, seeds = sections.pop("extends", None), sections.pop("seeds", None)
    merged = {} if base is None else load(Path(profile).parent / base)
    for name, values in sections.items():
        merged[name] = (merged.get(name) or {}) | (values or {})
    if seeds is not None:
        for name, values in merged.items():
            if "seeds" in values:
                values["seeds"] = seeds if isinstance(seeds, list) else planned(
                    Path(profile).parent / seeds, name)
    return merged


def planned(path: Path, notebook: str) -> list[int]:
    """The confirmatory seeds the analysis plan ``path`` fixes for ``notebook``."""
    counts = yaml.safe_load(path.read_text())["notebooks"]
    if notebook not in counts:
        sys.exit(f"error: the plan {path} fixes no seed count for {notebook}; it has "
                 f"{', '.join(sorted(counts))}")
    return plan.seeds(path, counts[notebook])


def main(profile: str, out_dir: str) -> int:
    sections = load(profile)
    notebooks = {p.stem for p in Path("notebooks").glob("[0-9]*.ipynb")}
    unknown = sorted(set(sections) - notebooks)
    if unknown:
        sys.exit(f"error: {profile} has section(s) {', '.join(unknown)} for no notebook; "
                 f"notebooks: {', '.join(sorted(notebooks))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(notebooks):
        text = yaml.safe_dump(sections.get(name) or {}, sort_keys=True)
        path = out / f"{name}.yaml"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"[params] {path} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
