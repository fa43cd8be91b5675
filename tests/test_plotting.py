import matplotlib.pyplot as plt
import pandas as pd

from flashlib import paths, plotting


def test_paper_vs_ours_has_the_four_columns():
    df = plotting.paper_vs_ours([("sparsity", 0.97, 0.91, "small model")])
    assert list(df.columns) == ["quantity", "paper", "ours", "note"]
    assert df.iloc[0]["ours"] == "0.91"


def test_smoke_outputs_never_land_in_figures(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png = plotting.save_figure(fig, "test_plot", smoke=True, io_mode="O_DIRECT")
    csv = plotting.save_table(pd.DataFrame({"a": [1]}), "test_table", smoke=True)
    assert paths.FIGURES not in png.parents and paths.FIGURES not in csv.parents
    assert png.stat().st_size > 0
    assert "O_DIRECT" not in csv.read_text()  # provenance goes to the .md, the csv stays machine-readable
    assert "cores" in csv.with_suffix(".md").read_text()


def test_git_revision_ignores_rewritten_figures(tmp_path, monkeypatch):
    import subprocess
    from flashlib import paths, plotting
    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "t.md").write_text("a")
    (tmp_path / "code.py").write_text("a")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    monkeypatch.setattr(paths, "REPO", tmp_path)
    plotting.git_revision.cache_clear()
    (tmp_path / "figures" / "t.md").write_text("b")              # a figure rewritten by a run
    assert not plotting.git_revision().endswith("+dirty")
    plotting.git_revision.cache_clear()
    (tmp_path / "code.py").write_text("b")                       # the code changed
    assert plotting.git_revision().endswith("+dirty")
    plotting.git_revision.cache_clear()
