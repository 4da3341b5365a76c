"""A1111's Prompt matrix: every combination of the prompt's parts after "|", laid out and labelled as a grid."""
from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import TINY
# ui_services and ui: test_ui's module fixtures, started again for this module.
from tests.test_ui import event, input_labels, ui, ui_services  # noqa: F401
from webui.prompt_matrix import matrix_plot
from webui.schemas import MAX_SEED, InvalidRequest
from webui.ui.generation import Session

BASE = {"prompt": "a street|at night|in the rain|with cars", "negative_prompt": "blurry|dark", "seed": 5, "steps": 2}


def test_every_combination_is_a_cell_the_first_parts_across():
    plot = matrix_plot(BASE)
    x, y, _ = plot.axes
    assert [x.label(i) for i in range(len(x.values))] == ["(none)", "at night", "in the rain", "at night, in the rain"]
    assert [y.label(i) for i in range(len(y.values))] == ["(none)", "with cars"]
    by_place = {(cell.x, cell.y): cell.request["prompt"] for cell in plot.cells}
    assert by_place == {
        (0, 0): "a street", (1, 0): "a street, at night", (2, 0): "a street, in the rain",
        (3, 0): "a street, at night, in the rain", (0, 1): "a street, with cars", (1, 1): "a street, at night, with cars",
        (2, 1): "a street, in the rain, with cars", (3, 1): "a street, at night, in the rain, with cars"}
    assert {cell.request["seed"] for cell in plot.cells} == {5}  # the parts alone make the difference
    assert {cell.request["negative_prompt"] for cell in plot.cells} == {"blurry|dark"}  # left as written


def test_the_options_put_parts_first_vary_the_seed_or_combine_the_negative_prompt():
    first = matrix_plot(BASE, parts_first=True).cells[3].request["prompt"]
    assert first == "at night, in the rain, a street"
    seeds = [cell.request["seed"] for cell in matrix_plot(BASE | {"seed": MAX_SEED}, different_seeds=True).cells]
    assert seeds[:3] == [MAX_SEED, 0, 1]  # one apart, wrapping round at the largest seed
    assert matrix_plot(BASE, joiner=" ").cells[3].request["prompt"] == "a street at night in the rain"
    negative = matrix_plot(BASE, negative=True)
    assert [cell.request["negative_prompt"] for cell in negative.cells] == ["blurry", "blurry, dark"]
    assert len(negative.axes[1].values) == 1 and negative.axes[1].type.label == "Nothing"  # one part: one row
    random_seeds = {(cell.request["seed"], cell.request["subseed"])
                    for cell in matrix_plot(BASE | {"seed": -1, "subseed": -1, "subseed_strength": 0.5}).cells}
    assert len(random_seeds) == 1 and -1 not in next(iter(random_seeds))  # both picked once for all


def test_parts_are_trimmed_as_a1111_trims_them_and_each_combination_is_one_picture():
    plot = matrix_plot(BASE | {"prompt": "a street, | at night, ||", "batch_size": 4, "n_iter": 3})
    assert [cell.request["prompt"] for cell in plot.cells] == ["a street", "a street, at night"]  # no empty part
    assert {(cell.request["batch_size"], cell.request["n_iter"]) for cell in plot.cells} == {(1, 1)}


@pytest.mark.parametrize("request_fields, says", [
    ({"prompt": "a street"}, 'the prompt has no parts to combine; write them after "\\|"'),
    ({"prompt": "a|" + "|".join("abcdefg")}, "7 parts make 128 pictures; at most 6 parts"),
    ({"prompt": "a street|" + "x" * 2000}, "Prompt matrix, " + "x" * 20),  # too long with the part added
    ({"steps": 0}, "^steps: "),  # wrong whatever the parts: said plainly
])
def test_what_cannot_run_is_named_before_anything_runs(request_fields, says):
    with pytest.raises(InvalidRequest, match=says):
        matrix_plot(BASE | request_fields)


def test_the_tab_runs_the_matrix_and_shows_its_labelled_grid_first(ui, ui_services):
    assert [input_labels(ui, "txt2img")[name] for name in ("prompt_matrix", "matrix_parts_first",
                                                          "matrix_different_seeds", "matrix_prompt")] == [
        "Prompt matrix", "Put variable parts at start of prompt", "Use different seed for each picture",
        "Select prompt"]
    *running, (session, gallery, progress, _, infotext, timing) = list(event(ui, "txt2img")(
        Session(), "a lighthouse|at dusk|in fog", steps=2, width=64, height=64, seed=11, model=TINY,
        prompt_matrix=True))
    assert any("Prompt matrix: picture 4 of 4" in str(update[2]) for update in running)
    assert progress == "" and "for 4 runs" in timing and len(gallery) == 5  # the grid, then each picture
    with Image.open(gallery[0][0]) as grid:
        assert grid.width > 2 * 64 and grid.height > 2 * 64  # two by two, with the labels around
    assert infotext.startswith("a lighthouse\n")  # the first picture's
    *_, (_, _, refused, *_) = list(event(ui, "txt2img")(Session(), "a lighthouse", steps=2, model=TINY,
                                                          prompt_matrix=True, xyz_plot=True))
    assert "use one of them at a time" in refused
