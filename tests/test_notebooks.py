"""Every numbered notebook is committed clean and runs to the end in smoke mode."""
import nbformat
import pytest

from flashlib import nbrun, paths

NOTEBOOKS = sorted(paths.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no numbered notebooks under notebooks/"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(nb):
    assert nbrun.cells_with_outputs(nb) == [], f"{nb.name} has outputs; clear them before committing"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_has_one_parameters_cell_with_smoke_switch(nb):
    book = nbformat.read(nb, as_version=4)
    cell = book.cells[nbrun.parameters_cell_index(book)]
    assert "SMOKE = False" in cell.source


@pytest.mark.slow
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_in_smoke_mode(nb):
    out = nbrun.execute(nb, smoke=True, timeout_s=600)
    executed = nbformat.read(out, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert nbrun.cells_with_outputs(nb) == []  # the committed notebook was not modified


def test_injection_follows_the_parameters_cell():
    book = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# t"),
        nbformat.v4.new_code_cell("SMOKE = False", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(SMOKE)"),
    ])
    nbrun.inject_parameters(book, {"SMOKE": True, "N": 3})
    assert book.cells[2].source == "SMOKE = True\nN = 3"
    assert book.cells[2].metadata["tags"] == ["injected-parameters"]


def test_missing_parameters_cell_is_a_clear_error():
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="tagged 'parameters'"):
        nbrun.inject_parameters(book, {"SMOKE": True})


def test_a_full_run_is_published_with_its_outputs_and_a_smoke_run_is_not(tmp_path, monkeypatch):
    nb = tmp_path / "99_tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("SMOKE = False", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print('smoke' if SMOKE else 'full')")]), nb)
    monkeypatch.setattr(paths, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(paths, "BUILD", tmp_path / "build")
    nbrun.execute(nb, smoke=True)
    assert not nbrun.published_path(nb).exists()
    nbrun.execute(nb, smoke=False)
    pub = nbformat.read(nbrun.published_path(nb), as_version=4)
    assert pub.cells[-1].outputs[0]["text"] == "full\n"
    assert nbrun.cells_with_outputs(nb) == []          # the source notebook stays clean
