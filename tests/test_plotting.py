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
