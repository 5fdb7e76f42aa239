"""``fcnify demo``: the real EfficientNet-Lite0 finds the pasted cat and espresso on the canvas."""

import pytest

from fcnify.cli import main
from fcnify.cli._demo import run_demo


@pytest.mark.slow
def test_demo_finds_the_cat_and_the_espresso_in_their_boxes(tmp_path):
    rows = run_demo(str(tmp_path), verbose=False, figure=str(tmp_path / "small.png"))
    by_photo = {row.photo: row for row in rows}
    assert set(by_photo) == {"cat", "espresso", "rocket"}
    for name in ("canvas.png", "heatmap-cat.png", "heatmap-espresso.png", "heatmap-rocket.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert (tmp_path / "small.png").stat().st_size < 300_000
    cat, espresso = by_photo["cat"], by_photo["espresso"]
    assert (cat.class_index, espresso.class_index) == (285, 967)
    for row in (cat, espresso):
        top, left, bottom, right = row.box
        y, x = row.peak_yx
        assert top <= y < bottom and left <= x < right, row  # checked here, not only by row.inside
        assert row.inside and row.peak > 0.5


def test_demo_is_a_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "-o DIR" in capsys.readouterr().out
