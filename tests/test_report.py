"""Report tables and figures: exact Markdown, hand-computed summaries, valid PNG files.

Recipes are the tiny two-block Llama of test_recipe.py (q/k/v/o 64 weights, gate/up/down
128, a block holds 640):
  unstructured  block 0: 0.5 0.25 0.75 0.5 | 0.5 0.625 0.375 -> 320/640 = 0.5
                block 1: 0.25 0.25 0.5 0.5 | 0.75 0.75 0.5  -> 352/640 = 0.55
  structured    block 0: 1 of 2 heads (attn 256 weights), 4 of 16 neurons (mlp 384)
                block 1: 0 heads, 8 of 16 neurons
"""

from __future__ import annotations

import math
import os
import struct
import zlib

import matplotlib
import numpy as np
import pytest
from matplotlib.image import imread
from test_recipe import (
    model_identity,
    nm_recipe,
    provenance,
    structured_recipe,
    unstructured_recipe,
)

from allocsearch.recipe import LayerEntry, Recipe, RecipeBudget, block_sparsities, fraction_removed
from allocsearch.report import (
    CompareRow,
    markdown_table,
    median_spread,
    plot_compare,
    plot_fitness_curves,
    plot_ppl_by_strategy,
    plot_sparsity_profile,
    plots,
)
from allocsearch.report.tables import format_column, format_value
from allocsearch.search.base import HistoryEntry

# ----------------------------------------------------------------------------- fixtures

ROWS = (
    CompareRow("uniform", 0.5, 85.84, 0, 0.12, 0.7),
    CompareRow("owl", 0.31, 48.071, 0, 1.25, 0.7),
    CompareRow("evopress", 0.12, 28.764, 25600, 3600.0, 0.7),
    CompareRow("dp", math.inf, None, 224, 30.5, 0.69984),
)

EXPECTED_TABLE = (
    "| strategy |    fitness | held-out ppl | evaluations | wall time (s) | achieved |\n"
    "| :------- | ---------: | -----------: | ----------: | ------------: | -------: |\n"
    "| dense    |        n/a |         6.14 |         n/a |           n/a |    0.00% |\n"
    "| uniform  |     0.5000 |        85.84 |       **0** |       **0.1** |   70.00% |\n"
    "| owl      |     0.3100 |        48.07 |       **0** |           1.2 |   70.00% |\n"
    "| evopress | **0.1200** |    **28.76** |      25,600 |        3600.0 |   70.00% |\n"
    "| dp       |        inf |          n/a |         224 |          30.5 |   69.98% |\n"
)


def history(fitness: list[float], step: int = 64) -> list[HistoryEntry]:
    return [
        HistoryEntry(g + 1, (g + 1) * step, (g + 1) * step * 128, f) for g, f in enumerate(fitness)
    ]


HISTORIES = {
    "evopress": history([0.5, 0.3, 0.2, 0.12]),
    "random": history([math.inf, 0.9, 0.8], step=100),  # first entry not yet scored
    "dp": history([0.25], step=224),
}
PPL_TABLE = {
    0.7: {"uniform": [85.0, 86.0, 90.0], "evopress": [28.0, 29.0, math.inf]},
    0.5: {"uniform": [8.05, 8.1], "evopress": [7.63, 7.6]},
}


def gapped_recipe() -> Recipe:
    """q of blocks 0 and 2 (none in block 1) plus an lm_head outside the blocks (-1)."""
    layers = (
        LayerEntry(
            name="model.layers.0.self_attn.q_proj", role="q", block=0, shape=(8, 8), sparsity=0.5
        ),
        LayerEntry(
            name="model.layers.2.self_attn.q_proj", role="q", block=2, shape=(8, 8), sparsity=0.25
        ),
        LayerEntry(name="lm_head", role="lm_head", block=-1, shape=(32, 8), sparsity=0.0),
    )
    return Recipe(
        model=model_identity(),
        layers=layers,
        budget=RecipeBudget(kind="params", target=0.1, achieved=fraction_removed(layers, "params")),
        provenance=provenance(strategy="manual"),
    )


PLOTTERS = {
    "profile": (
        lambda p, **kw: plot_sparsity_profile(unstructured_recipe(), p, **kw),
        plots.PROFILE_SIZE_IN,
    ),
    "fitness": (
        lambda p, **kw: plot_fitness_curves(HISTORIES, p, metric_name="KL", **kw),
        plots.FITNESS_SIZE_IN,
    ),
    "compare": (lambda p, **kw: plot_compare(ROWS, p, dense_ppl=6.14, **kw), plots.COMPARE_SIZE_IN),
    "ppl": (
        lambda p, **kw: plot_ppl_by_strategy(PPL_TABLE, p, dense_ppl=6.14, **kw),
        (plots.PPL_PANEL_SIZE_IN[0], 2 * plots.PPL_PANEL_SIZE_IN[1]),
    ),
}


def png_chunks(data: bytes) -> list[bytes]:
    """Chunk types of a PNG file, checking each chunk's CRC."""
    assert data[:8] == plots.PNG_SIGNATURE
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        kinds.append(kind)
        pos += 12 + length
    return kinds


def assert_png(path, size_in) -> np.ndarray:
    """Check ``path`` is a PNG of the expected pixel size; return its pixels."""
    data = path.read_bytes()
    kinds = png_chunks(data)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert not {b"tEXt", b"iTXt", b"zTXt", b"tIME"} & set(kinds)  # no version, no timestamp
    pixels = imread(path)
    width, height = (round(v * plots.DPI) for v in size_in)
    assert pixels.shape == (height, width, 4)
    rgba = np.round(pixels * 255).astype(np.uint32)
    packed = (rgba[..., 0] << 24) | (rgba[..., 1] << 16) | (rgba[..., 2] << 8) | rgba[..., 3]
    assert len(np.unique(packed)) > 10  # something was drawn: many distinct colours
    return pixels


# ----------------------------------------------------------------------------- tables


def test_markdown_table_exact_text():
    assert markdown_table(ROWS, dense_ppl=6.14) == EXPECTED_TABLE


def test_markdown_table_without_dense_and_single_row_has_no_bold():
    text = markdown_table(ROWS[2:3])
    assert text == (
        "| strategy | fitness | held-out ppl | evaluations | wall time (s) | achieved |\n"
        "| :------- | ------: | -----------: | ----------: | ------------: | -------: |\n"
        "| evopress |  0.1200 |        28.76 |      25,600 |        3600.0 |   70.00% |\n"
    )


def test_markdown_table_ties_as_displayed_and_pipe_escaped():
    rows = [
        CompareRow("a|b", 0.012341, 10.004, 5, 1.0, 0.5),
        CompareRow("c", 0.012344, 10.001, 6, 1.0, 0.5),
    ]
    lines = markdown_table(rows).splitlines()
    # 0.012341 and 0.012344 print as 0.01234 (5 decimals = 4 significant digits): a tie.
    assert (
        lines[2]
        == "| a\\|b     | **0.01234** |    **10.00** |       **5** |       **1.0** |   50.00% |"
    )
    assert (
        lines[3]
        == "| c        | **0.01234** |    **10.00** |           6 |       **1.0** |   50.00% |"
    )


def test_markdown_table_of_encoders_shows_distance_and_nn_agreement_not_ppl():
    """Encoder rows (held-out distance to the dense model, NN agreement) replace the
    held-out ppl column; NN agreement is bold where highest, the distance where lowest."""
    rows = [
        CompareRow("uniform", 0.02, None, 0, 0.5, 0.5, heldout_distance=0.0123, nn_agreement=0.75),
        CompareRow("dp", 0.01, None, 40, 2.0, 0.5, heldout_distance=0.00456, nn_agreement=1.0),
    ]
    assert markdown_table(rows) == (
        "| strategy |     fitness | held-out distance | NN agreement | evaluations "
        "| wall time (s) | achieved |\n"
        "| :------- | ----------: | ----------------: | -----------: | ----------: "
        "| ------------: | -------: |\n"
        "| uniform  |     0.02000 |          0.012300 |        75.0% |       **0** "
        "|       **0.5** |   50.00% |\n"
        "| dp       | **0.01000** |      **0.004560** |   **100.0%** |          40 "
        "|           2.0 |   50.00% |\n"
    )
    with pytest.raises(ValueError, match="rows mix held-out perplexity"):
        markdown_table(rows, dense_ppl=5.0)
    with pytest.raises(ValueError, match="rows mix held-out perplexity"):
        markdown_table([*rows, ROWS[2]])
    with pytest.raises(ValueError, match="not both"):
        CompareRow("x", 0.1, 5.0, 0, 0.1, 0.5, heldout_distance=0.1)
    with pytest.raises(ValueError, match=r"nn_agreement = 1.5; it is a fraction in \[0, 1\]"):
        CompareRow("x", 0.1, None, 0, 0.1, 0.5, nn_agreement=1.5)
    with pytest.raises(ValueError, match="heldout_distance = -0.1"):
        CompareRow("x", 0.1, None, 0, 0.1, 0.5, heldout_distance=-0.1)


def test_plot_compare_of_encoder_rows(tmp_path):
    rows = [
        CompareRow("uniform", 0.02, None, 0, 0.5, 0.5, heldout_distance=0.0123, nn_agreement=0.75),
        CompareRow("dp", 0.01, None, 40, 2.0, 0.5, heldout_distance=0.00456, nn_agreement=1.0),
    ]
    for metric in ("heldout_distance", "nn_agreement"):
        path = plot_compare(rows, tmp_path / f"{metric}.png", metric=metric)
        assert_png(path, plots.COMPARE_SIZE_IN)


@pytest.mark.parametrize(
    "metric, value, text",
    [
        ("heldout_ppl", 28.765, "28.77"),
        ("evaluations", 1234567, "1,234,567"),
        ("wall_time_s", 59.96, "60.0"),
        ("achieved", 0.525, "52.50%"),
        ("fitness", 0.000123456, "0.0001235"),
        ("fitness", 123.456, "123.5"),
        ("fitness", None, "n/a"),
        ("heldout_ppl", math.inf, "inf"),
        ("nn_agreement", 0.875, "87.5%"),
        ("heldout_distance", 0.0012346, "0.001235"),
    ],
)
def test_format_value(metric, value, text):
    assert format_value(metric, value) == text


def test_format_column_shares_fitness_decimals():
    texts = format_column("fitness", [0.5, 0.012, None, math.inf])
    assert texts == ["0.50000", "0.01200", "n/a", "inf"]
    assert format_column("heldout_ppl", [7.634, None]) == ["7.63", "n/a"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": ""}, "strategy must be a non-empty string"),
        ({"fitness": math.nan}, "fitness = nan"),
        ({"heldout_ppl": 0.5}, "perplexity is a number >= 1"),
        ({"evaluations": -1}, "evaluations = -1 must be >= 0"),
        ({"evaluations": 2.0}, "evaluations must be an integer"),
        ({"wall_time_s": -0.1}, "wall_time_s = -0.1"),
        ({"achieved": 1.5}, r"achieved = 1.5; it is a fraction removed in \[0, 1\]"),
        ({"fitness": True}, "fitness must be a number"),
    ],
)
def test_compare_row_rejects_bad_values(kwargs, match):
    base = dict(
        strategy="s", fitness=0.1, heldout_ppl=10.0, evaluations=1, wall_time_s=1.0, achieved=0.5
    )
    with pytest.raises(ValueError, match=match):
        CompareRow(**{**base, **kwargs})


def test_markdown_table_rejects_bad_input():
    with pytest.raises(ValueError, match="rows is empty"):
        markdown_table([])
    with pytest.raises(ValueError, match="'owl' appears twice"):
        markdown_table([ROWS[1], ROWS[1]])
    with pytest.raises(ValueError, match="dense_ppl = 0.5"):
        markdown_table(ROWS, dense_ppl=0.5)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([3.0, 1.0, 2.0], (2.0, 1.0, 3.0)),
        ([4.0, 1.0, 3.0, 2.0], (2.5, 1.0, 4.0)),
        ([7.5], (7.5, 7.5, 7.5)),
        ([10.0, math.inf, 12.0], (12.0, 10.0, math.inf)),
        (np.array([28.0, 29.0, 30.5, 27.5]), (28.5, 27.5, 30.5)),
    ],
)
def test_median_spread_hand_computed(values, expected):
    assert median_spread(values) == expected


def test_median_spread_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        median_spread([])
    with pytest.raises(ValueError, match="NaN at positions \\[1\\]"):
        median_spread([1.0, math.nan])


# ----------------------------------------------------------------------------- plotted data


def test_profile_series_unstructured_by_role():
    series = plots._profile_series(unstructured_recipe())
    assert list(series) == ["q", "k", "v", "o", "gate", "up", "down"]
    np.testing.assert_array_equal(series["q"][0], [0, 1])
    np.testing.assert_array_equal(series["q"][1], [0.5, 0.25])
    np.testing.assert_array_equal(series["up"][1], [0.625, 0.75])


def test_profile_series_structured_units_are_weight_sparsity():
    series = plots._profile_series(structured_recipe())
    assert list(series) == ["heads", "neurons"]
    np.testing.assert_array_equal(series["heads"][1], [0.5, 0.0])
    np.testing.assert_array_equal(series["neurons"][1], [0.25, 0.5])
    # With k/v of block 0 at 0.25: attn = (2 * 64 * 0.5 + 2 * 64 * 0.25) / 256 = 0.375.
    np.testing.assert_allclose(
        plots._profile_series(structured_recipe(0.25))["heads"][1], [0.375, 0.0]
    )


@pytest.mark.parametrize("make", [unstructured_recipe, nm_recipe, structured_recipe])
def test_block_sparsity_agrees_with_exporter(make):
    recipe = make()
    blocks, values = plots._block_sparsity(recipe)
    np.testing.assert_array_equal(blocks, [0, 1])
    np.testing.assert_allclose(values, block_sparsities(recipe), rtol=1e-15)


def test_block_sparsity_hand_computed_with_gap_and_head():
    blocks, values = plots._block_sparsity(gapped_recipe())
    np.testing.assert_array_equal(blocks, [0, 2])
    np.testing.assert_array_equal(values, [0.5, 0.25])
    np.testing.assert_array_equal(plots._block_sparsity(unstructured_recipe())[1], [0.5, 0.55])
    np.testing.assert_allclose(plots._block_sparsity(structured_recipe())[1], [0.35, 0.3])


# ----------------------------------------------------------------------------- figures


@pytest.mark.parametrize("name", sorted(PLOTTERS))
def test_each_plot_writes_a_valid_png_and_is_deterministic(name, tmp_path):
    plot, size_in = PLOTTERS[name]
    first = plot(tmp_path / "a.png")
    assert first == tmp_path / "a.png"
    assert_png(first, size_in)
    plot(tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes() == first.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]  # no temporary files
    assert first.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "recipe",
    [structured_recipe(0.25), nm_recipe(), gapped_recipe()],
    ids=["structured", "nm", "gapped"],
)
def test_profile_of_other_recipes(recipe, tmp_path):
    assert_png(
        plot_sparsity_profile(recipe, tmp_path / "p.png", title="custom"), plots.PROFILE_SIZE_IN
    )


def test_different_inputs_give_different_images(tmp_path):
    plot_sparsity_profile(unstructured_recipe(), tmp_path / "a.png")
    plot_sparsity_profile(unstructured_recipe(), tmp_path / "b.png", title="other title")
    plot_compare(ROWS, tmp_path / "c.png", dense_ppl=6.14)
    plot_compare(ROWS, tmp_path / "d.png", metric="wall_time_s")
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "c.png").read_bytes() != (tmp_path / "d.png").read_bytes()


def test_one_panel_per_sparsity_sets_the_height(tmp_path):
    path = plot_ppl_by_strategy({0.5: {"a": [10.0, 12.0, 11.0]}}, tmp_path / "one.png")
    assert_png(path, plots.PPL_PANEL_SIZE_IN)


def test_refuses_to_overwrite_unless_asked(tmp_path):
    plot, size_in = PLOTTERS["compare"]
    target = tmp_path / "c.png"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        plot(target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["c.png"]
    plot(target, overwrite=True)
    assert_png(target, size_in)
    assert os.listdir(tmp_path) == ["c.png"]


def test_file_created_while_drawing_is_not_clobbered(tmp_path, monkeypatch):
    target = tmp_path / "c.png"
    render = plots._png_bytes

    def render_then_race(fig):
        data = render(fig)
        target.write_bytes(b"someone else")  # another writer wins the race
        return data

    monkeypatch.setattr(plots, "_png_bytes", render_then_race)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        plot_compare(ROWS, target)
    assert target.read_bytes() == b"someone else"
    assert os.listdir(tmp_path) == ["c.png"]


def test_nothing_left_behind_when_writing_fails(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        plot_fitness_curves(HISTORIES, tmp_path / "f.png", metric_name="KL")
    assert os.listdir(tmp_path) == []


def test_nothing_left_behind_when_drawing_fails(tmp_path, monkeypatch):
    def broken_render(fig):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(plots, "_png_bytes", broken_render)
    with pytest.raises(RuntimeError, match="renderer failed"):
        plot_sparsity_profile(unstructured_recipe(), tmp_path / "p.png")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_nothing_left_behind_in_an_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            plot_compare(ROWS, locked / "c.png")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_compare(ROWS, tmp_path / "missing" / "c.png")
    with pytest.raises(ValueError, match="use a .png path"):
        plot_compare(ROWS, tmp_path / "c.svg")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: plot_fitness_curves({}, p, metric_name="KL"), "histories is empty"),
        (
            lambda p: plot_fitness_curves({"x": []}, p, metric_name="KL"),
            "x: its history has no entry",
        ),
        (
            lambda p: plot_fitness_curves({"x": history([math.inf])}, p, metric_name="KL"),
            "no entry with a finite best_fitness",
        ),
        (
            lambda p: plot_fitness_curves(
                {"x": [HistoryEntry(1, 10, 0, 1.0), HistoryEntry(2, 5, 0, 0.5)]},
                p,
                metric_name="KL",
            ),
            "entry 1 has 5 after 10",
        ),
        (lambda p: plot_fitness_curves(HISTORIES, p, metric_name=""), "metric_name"),
        (lambda p: plot_compare(ROWS, p, metric="ppl"), "metric 'ppl' is not one of"),
        (lambda p: plot_compare(ROWS, p, metric="fitness", dense_ppl=6.0), "'heldout_ppl' only"),
        (lambda p: plot_compare([ROWS[3]], p), "no row has a finite 'heldout_ppl'"),
        (lambda p: plot_ppl_by_strategy({}, p), "table is empty"),
        (lambda p: plot_ppl_by_strategy({50: {"a": [10.0]}}, p), "sparsity 50 is outside"),
        (lambda p: plot_ppl_by_strategy({0.5: {"a": []}}, p), "non-empty list"),
        (lambda p: plot_ppl_by_strategy({0.5: {"a": [math.nan]}}, p), "below 1 or NaN"),
        (lambda p: plot_ppl_by_strategy({0.5: {"a": [10.0]}}, p, dense_ppl=0.0), "dense_ppl = 0.0"),
        (lambda p: plot_sparsity_profile(unstructured_recipe(), p, title=3), "title must be"),
    ],
)
def test_bad_inputs_raise_before_writing(call, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_user_style_does_not_change_the_bytes_and_is_restored(tmp_path):
    plot_compare(ROWS, tmp_path / "a.png")
    with matplotlib.rc_context({"lines.linewidth": 7.0, "font.size": 20.0, "axes.grid": True}):
        plot_compare(ROWS, tmp_path / "b.png")
        assert matplotlib.rcParams["font.size"] == 20.0  # the caller's style is back
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_plot_compare_draws_the_table_columns_on_axes_that_show_differences(tmp_path, monkeypatch):
    """Issue 28.8: compare.png drew held-out perplexity alone on an axis from 0, where
    5.75 vs 5.81 looked equal. It draws the table's columns, one panel each, each axis
    spanning its values (the spread is at least half the axis); the dense perplexity
    is named in the legend without stretching the axis."""
    figures = []
    monkeypatch.setattr(plots, "_png_bytes", lambda fig: figures.append(fig) or b"png")
    rows = [
        CompareRow("uniform", 0.4312, 5.81, 0, 0.1, 0.7),
        CompareRow("owl", 0.4102, 5.79, 0, 0.2, 0.7),
        CompareRow("evopress", 0.3561, 5.75, 1200, 286.0, 0.70001),
    ]
    plot_compare(rows, tmp_path / "c.png", dense_ppl=4.9)
    axes = [ax for ax in figures[-1].axes if ax.get_visible()]
    fields = ("fitness", "heldout_ppl", "evaluations", "wall_time_s", "achieved")
    assert [ax.get_title() for ax in axes] == [plots._METRIC_LABEL[f] for f in fields]
    ppl = axes[1]
    lo, hi = ppl.get_ylim()
    assert lo > 5.7 and hi < 5.9 and (5.81 - 5.75) / (hi - lo) >= 0.5
    assert [t.get_text() for t in ppl.get_legend().get_texts()] == ["dense 4.90"]
    assert [t.get_text() for t in ppl.texts] == ["5.81", "5.79", "5.75"]
    lo, hi = axes[0].get_ylim()
    assert (0.4312 - 0.3561) / (hi - lo) >= 0.5
    assert axes[2].get_ylim()[0] == 0.0  # counts from 0 when that is the smallest value

    encoder = [
        CompareRow("uniform", 0.02, None, 0, 0.5, 0.5, heldout_distance=0.0123, nn_agreement=0.75),
        CompareRow("dp", 0.01, None, 40, 2.0, 0.5, heldout_distance=0.00456, nn_agreement=1.0),
    ]
    plot_compare(encoder, tmp_path / "e.png")
    titles = [ax.get_title() for ax in figures[-1].axes if ax.get_visible()]
    assert titles[1:3] == [plots._METRIC_LABEL["heldout_distance"],
                           plots._METRIC_LABEL["nn_agreement"]]  # fmt: skip
