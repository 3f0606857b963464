"""Figures are written as PDF and PNG, byte-identical when regenerated."""

from irn import plotting


def test_save_is_deterministic_and_leaves_no_temporary_files(tmp_path):
    for run in ("a", "b"):
        fig = plotting.spectral_radii(h_max=3.0, points=50)
        plotting.save(fig, "radius", tmp_path / run)
    for ext in ("pdf", "png"):
        a, b = (tmp_path / run / f"radius.{ext}" for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    assert b"CreationDate" not in (tmp_path / "a" / "radius.pdf").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["radius.pdf", "radius.png"]
