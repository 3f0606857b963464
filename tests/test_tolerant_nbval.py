"""The nbval comparison with numeric tolerances: it accepts what differs between machines (the
cases seen on another CPU) and still catches a real change."""

import nbformat
import pytest

from tolerant_nbval import CellTolerance, Tolerance, _align, agree, differences, last_place

# notebook 2's claims row as the reference prints it and as another CPU printed it
ROW = "   1b  state  +0.049 [+0.0105, +0.0875]      2          0 inconclusive"


def test_last_place_of_printed_numbers():
    assert last_place("0.0105") == pytest.approx(1e-4)
    assert last_place("+44") == 0  # a count: exact
    assert last_place("1.2677e+30") == pytest.approx(1e26)
    assert last_place("-8.35e-05") == pytest.approx(1e-7)


def test_a_rounding_flip_in_the_last_digit_is_accepted():
    assert agree(ROW, ROW.replace("+0.0105", "+0.0106"), Tolerance())


def test_a_change_beyond_the_last_digit_is_caught():
    changed = ROW.replace("+0.0105", "+0.0125")
    assert not agree(ROW, changed, Tolerance())
    assert differences(ROW, changed, Tolerance()) == [
        "+0.0125 where the reference has +0.0105 (allowed +-0.0001)"]


def test_words_and_counts_must_match_exactly():
    assert differences(ROW, ROW.replace("inconclusive", "holds"), Tolerance(rel=1.0)) is None
    assert differences(ROW, ROW + " 3", Tolerance(rel=1.0)) is None
    # an integer is a count: exact unless the cell allows more
    assert not agree("not conv. 0", "not conv. 1", Tolerance())
    assert agree("iterations 40", "iterations 41", Tolerance(rel=0.05))


def test_column_width_does_not_matter():
    assert agree("a    9.9   b", "a   10.0  b", Tolerance())


def test_relative_tolerance_widens_the_check():
    # notebook 4's Fletcher-Reeves row on a trained model, reference and another CPU
    reference, other = "nonlinear_cg (FR) 19.4 36 10", "nonlinear_cg (FR) 20.7 44 10"
    assert not agree(reference, other, Tolerance(rel=0.1))
    assert agree(reference, other, Tolerance(rel=0.25))


def test_nan_and_inf_compare_as_themselves():
    assert agree("loss nan", "loss nan", Tolerance())
    assert not agree("loss nan", "loss 1.0", Tolerance(rel=1.0))
    assert not agree("loss inf", "loss 1.0", Tolerance(abs=10.0))


@pytest.mark.parametrize("source, expected", [
    ("# NBVAL_CHECK_OUTPUT\nprint(1)", CellTolerance()),
    ("# NBVAL_CHECK_OUTPUT\n# NBVAL_TOLERANCE rel=0.05\nprint(1)",
     CellTolerance(Tolerance(rel=0.05))),
    ("# NBVAL_TOLERANCE rel=2e-2 abs=0.5 units=3",
     CellTolerance(Tolerance(rel=0.02, abs=0.5, units=3))),
    ("# NBVAL_TOLERANCE abs=0.002\n# NBVAL_TOLERANCE lines=^\\s*5a\\s abs=0.3",
     CellTolerance(Tolerance(abs=0.002), (Tolerance(abs=0.3, lines=r"^\s*5a\s"),))),
])
def test_cell_directive(source, expected):
    assert CellTolerance.of_cell(source) == expected


@pytest.mark.parametrize("source", ["# NBVAL_TOLERANCE rtol=0.05", "# NBVAL_TOLERANCE",
                                    "# NBVAL_TOLERANCE rel=0.1 (why)",
                                    "# NBVAL_TOLERANCE rel=0.1\n# NBVAL_TOLERANCE abs=1"])
def test_malformed_directive_is_an_error(source):
    with pytest.raises(ValueError, match="NBVAL_TOLERANCE"):
        CellTolerance.of_cell(source)


def test_units_widen_in_printed_digits():
    assert not agree("fwd iters 13.6", "fwd iters 13.8", Tolerance())
    assert agree("fwd iters 13.6", "fwd iters 13.8", Tolerance(units=5))
    assert not agree("fwd iters 13.6", "fwd iters 14.2", Tolerance(units=5))


def test_line_scoped_tolerance_applies_to_its_lines_only():
    cell = CellTolerance.of_cell("# NBVAL_TOLERANCE abs=0.002\n# NBVAL_TOLERANCE lines=^\\s*5a\\s abs=0.3")
    reference = "   1a  state  +0.0624\n   5a  state  +0"
    assert agree(reference, "   1a  state  +0.0626\n   5a  state  +0.125", cell)
    assert not agree(reference, "   1a  state  +0.125\n   5a  state  +0", cell)
    # a missing or extra line is a difference of words, not of numbers
    assert differences(reference, "   1a  state  +0.0624", cell) is None


def test_align_gives_agreeing_outputs_the_reference_text():
    stream = nbformat.v4.new_output("stream", name="stdout", text=ROW)
    result = nbformat.v4.new_output("execute_result", data={"text/plain": "x = 1.25"})
    reference = [stream, result]
    close = [nbformat.v4.new_output("stream", name="stdout", text=ROW.replace("0.0105", "0.0106")),
             nbformat.v4.new_output("execute_result", data={"text/plain": "x = 1.26"})]
    _align("", reference, close)
    assert close[0]["text"] == ROW and close[1]["data"]["text/plain"] == "x = 1.25"
    far = [nbformat.v4.new_output("stream", name="stdout", text=ROW.replace("0.0105", "0.0205"))]
    _align("", reference, far)
    assert far[0]["text"] != ROW  # left as it is: nbval reports the difference


def _checked_notebook(path, printed_reference):
    """A notebook whose checked cell prints ``x = 1.2345`` and whose stored output (the
    reference nbval compares with) is ``printed_reference``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint('x = 1.2345, runs 3')",
                                     execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout",
                                           text=f"{printed_reference}\n")]
    nb.cells = [cell]
    nbformat.write(nb, str(path))


@pytest.mark.parametrize("reference, passes", [
    ("x = 1.2345, runs 3", True),
    ("x = 1.2346, runs 3", True),     # the last digit: a rounding difference
    ("x = 1.2365, runs 3", False),    # 20 units: a real change
    ("x = 1.2345, runs 4", False),    # a count
    ("x = 1.2345, run 3", False),     # a word
])
def test_nbval_itself_uses_the_tolerance(tmp_path, reference, passes):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    _checked_notebook(tmp_path / "check.ipynb", reference)
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    shutil.copy(Path(__file__).with_name("tolerant_nbval.py"), tmp_path / "tolerant_nbval.py")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax",
                             "--nbval-current-env", "-p", "no:cacheprovider", "check.ipynb"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert (result.returncode == 0) == passes, result.stdout[-2000:]
