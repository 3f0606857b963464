"""Split a profile (params/<profile>.yaml, one section per notebook) into one file per
notebook, rewriting a file only when its content changes, so that make re-runs only the
notebooks whose parameters changed. A profile may start from another one
(`extends: paper.yaml`, a file beside it) and set only the parameters it changes.

    python scripts/split_params.py params/paper.yaml build/paper/params
"""

import sys
from pathlib import Path

import yaml


def load(profile) -> dict:
    """The profile's sections (notebook -> parameters), those of the profile it ``extends``
    updated parameter by parameter with its own."""
    sections = yaml.safe_load(Path(profile).read_text()) or {}
    base = sections.pop("extends", None)
    if base is None:
        return sections
    merged = load(Path(profile).parent / base)
    for name, values in sections.items():
        merged[name] = (merged.get(name) or {}) | (values or {})
    return merged


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
