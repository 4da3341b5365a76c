"""The X/Y/Z plot: axis values as A1111 writes them, the combinations' requests, the labelled grid, and a plot run
from the txt2img tab on the tiny model (64x64, 1-2 steps)."""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY
# ui_services and ui: test_ui's module fixtures, started again for this module.
from tests.test_ui import event, input_labels, ui, ui_services  # noqa: F401
from webui.schemas import InvalidRequest, JobState, parse_request
from webui.ui.generation import Session
from webui import xyz_plot
from webui.xyz_plot import MAX_PLOT_CELLS, draw_grid, plan, read_axis


# --- values --------------------------------------------------------------------------------

@pytest.mark.parametrize("axis_type, text, values", [
    ("Steps", "5, 10,20", [5, 10, 20]),
    ("Steps", "1-5", [1, 2, 3, 4, 5]),
    ("Steps", "1-9 (+2), 15", [1, 3, 5, 7, 9, 15]),
    ("Steps", "10-1 (-3)", [10, 7, 4, 1]),  # the end is kept, counting down too
    ("Steps", "1-10 [4]", [1, 4, 7, 10]),
    ("Steps", "1-10 [5]", [1, 3, 5, 7, 10]),  # A1111 cuts 3.25 to 3 and 5.5 to 5
    ("Sampler", "Euler\nDDIM", ["Euler", "DDIM"]),  # a line break parts values too
    ("CFG Scale", "0-1 [5]", [0, 0.25, 0.5, 0.75, 1]),
    ("CFG Scale", "3-4.5 (+0.5)", [3, 3.5, 4, 4.5]),
    ("Seed", "-1, 7", [-1, 7]),
    ("Seed", "-3-1", [-3, -2, -1, 0, 1]),
    # whole numbers stay exact past 2**53 (seeds go to 2**64 - 1); a float count lost them (found by review)
    ("Seed", "12345678901234567890-12345678901234567892", [12345678901234567890 + i for i in range(3)]),
    ("Seed", "18446744073709551610-18446744073709551615 (+2)", [2**64 - 6, 2**64 - 4, 2**64 - 2]),
    ("Seed", "1152921504606846977-1152921504606846981 [3]", [2**60 + 1, 2**60 + 3, 2**60 + 5]),
    ("Sampler", 'Euler a, "DPM++ 2M, Karras" ,DDIM', ["Euler a", "DPM++ 2M, Karras", "DDIM"]),
    ("Steps", " ", [None]),  # no values: an axis that changes nothing
])
def test_axis_values_are_read_as_a1111_writes_them(axis_type, text, values):
    assert read_axis("X", axis_type, text).values == values


@pytest.mark.parametrize("axis_type, text, says", [
    ("Steps", "5, many", "X values: 'many' is no whole number or range"),
    ("Steps", "1.5-3", "takes whole numbers"),
    ("Steps", "1-5 (+0)", "a step of 0 never gets from 1 to 5"),
    ("Steps", "1-5 (-1)", "never gets from 1 to 5"),
    ("Steps", "1-500", "more than 64 values"),
    ("Steps", "1-5 [0]", "take 1 to 64 values"),
    ("Seed", "1-" + "9" * 400, "X values"),
    ("Colour", "red", "X type: 'Colour' is no axis type"),
])
def test_unreadable_axis_values_say_what_to_write(axis_type, text, says):
    with pytest.raises(InvalidRequest, match=says.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        read_axis("X", axis_type, text)


# --- the combinations ------------------------------------------------------------------------

BASE = {"prompt": "a cat on a mat", "negative_prompt": "blurry cat", "steps": 4, "seed": -1, "subseed": -1}


def test_every_combination_runs_once_x_fastest_with_one_seed_for_all():
    axes = [read_axis("X", "Steps", "1, 2"), read_axis("Y", "Sampler", "Euler, DDIM"), read_axis("Z", "Nothing", "")]
    cells = plan(BASE, axes).cells
    assert [(c.x, c.y, c.z, c.request["steps"], c.request["sampler_name"]) for c in cells] == [
        (0, 0, 0, 1, "Euler"), (1, 0, 0, 2, "Euler"), (0, 1, 0, 1, "DDIM"), (1, 1, 0, 2, "DDIM")]
    seeds = {(c.request["seed"], c.request["subseed"]) for c in cells}
    assert len(seeds) == 1 and -1 not in next(iter(seeds))  # picked once: the axes alone make the difference
    kept = plan(BASE, axes, keep_random_seeds=True).cells
    assert {c.request["seed"] for c in kept} == {-1}
    assert BASE["seed"] == -1  # the caller's request is left alone


def test_seeds_vary_along_the_axes_asked_x_fastest_as_a1111_counts():
    axes = [read_axis("X", "Steps", "1, 2"), read_axis("Y", "CFG Scale", "5, 6, 7"), read_axis("Z", "Nothing", "")]
    cells = plan(BASE | {"seed": 40}, axes, vary_seeds=(True, True, False)).cells
    assert [cell.request["seed"] for cell in cells] == [40, 41, 42, 43, 44, 45]
    assert [cell.request["seed"] for cell in plan(BASE | {"seed": 40}, axes, vary_seeds=(False, True, False)).cells
            ] == [40, 40, 41, 41, 42, 42]


def test_prompt_search_and_replace_changes_both_prompts_and_needs_its_first_value_there():
    axes = [read_axis("X", "Prompt S/R", "cat, dog"), read_axis("Y", "Nothing", ""), read_axis("Z", "Nothing", "")]
    cells = plan(BASE, axes).cells
    assert [(c.request["prompt"], c.request["negative_prompt"]) for c in cells] == [
        ("a cat on a mat", "blurry cat"), ("a dog on a mat", "blurry dog")]
    assert [axes[0].label(i) for i in range(2)] == ["cat", "dog"]
    with pytest.raises(InvalidRequest, match="Prompt S/R's first value 'bird' is not in the prompt"):
        plan(BASE, [read_axis("X", "Prompt S/R", "bird, fish"), *axes[1:]])
    with pytest.raises(InvalidRequest, match="not in the prompt"):  # each prompt on its own, not the two joined
        plan({"prompt": "a ca", "negative_prompt": "t"}, [read_axis("X", "Prompt S/R", "cat, dog"), *axes[1:]])


def test_prompt_search_and_replace_reaches_the_hires_prompts_too():
    axes = [read_axis("X", "Prompt S/R", "cat, dog"), read_axis("Y", "Nothing", ""), read_axis("Z", "Nothing", "")]
    hires = {"enable_hr": True, "hr_prompt": "a sharp cat", "hr_negative_prompt": "dull"}
    assert [(c.request["prompt"], c.request["hr_prompt"], c.request["hr_negative_prompt"])
            for c in plan(BASE | hires, axes).cells] == [("a cat on a mat", "a sharp cat", "dull"),
                                                        ("a dog on a mat", "a sharp dog", "dull")]
    # found in the hires prompt alone, it is still found
    only_hires = plan({"prompt": "a mat", "enable_hr": True, "hr_prompt": "a cat"}, axes).cells
    assert [(c.request["prompt"], c.request["hr_prompt"]) for c in only_hires] == [("a mat", "a cat"), ("a mat", "a dog")]


def test_the_hires_axes_set_the_second_passs_sampler_and_upscaler():
    axes = [read_axis("X", "Hires sampler", "DDIM, DPM++ 2M Karras"), read_axis("Y", "Hires upscaler", "Latent, Lanczos"),
            read_axis("Z", "Nothing", "")]
    cells = plan(BASE | {"enable_hr": True}, axes).cells
    assert [(c.request["hr_sampler_name"], c.request["hr_upscaler"]) for c in cells] == [
        ("DDIM", "Latent"), ("DPM++ 2M Karras", "Latent"), ("DDIM", "Lanczos"), ("DPM++ 2M Karras", "Lanczos")]
    assert [axes[0].label(1), axes[1].label(1)] == ["Hires sampler: DPM++ 2M Karras", "Hires upscaler: Lanczos"]


def test_the_styles_and_refiner_axes_add_styles_and_set_the_refiner():
    axes = [read_axis("X", "Styles", 'Film, "Film,Ink"'), read_axis("Y", "Refiner checkpoint", "None, other"),
            read_axis("Z", "Refiner switch at", "0.5, 0.8")]
    cells = plan(BASE | {"styles": ["Base"]}, axes).cells
    assert [c.request["styles"] for c in cells[:2]] == [["Base", "Film"], ["Base", "Film", "Ink"]]
    assert [c.request["refiner_checkpoint"] for c in cells[:4]] == ["None", "None", "other", "other"]
    assert [c.request["refiner_switch_at"] for c in cells[::4]] == [0.5, 0.8]
    assert [axes[0].label(1), axes[1].label(1), axes[2].label(0)] == [
        "Styles: Film,Ink", "Refiner checkpoint: other", "Refiner switch at: 0.5"]
    with pytest.raises(InvalidRequest, match="Refiner switch at: 1.5"):
        plan(BASE, [read_axis("X", "Refiner switch at", "1.5"), read_axis("Y", "Nothing", ""),
                    read_axis("Z", "Nothing", "")])


def test_prompt_order_puts_the_words_in_every_order_in_their_places():
    axes = [read_axis("X", "Prompt order", "red, big, apple"), read_axis("Y", "Nothing", ""),
            read_axis("Z", "Nothing", "")]
    cells = plan(BASE | {"prompt": "a big red shiny apple"}, axes).cells
    assert [c.request["prompt"] for c in cells] == [
        "a red big shiny apple", "a red apple shiny big", "a big red shiny apple", "a big apple shiny red",
        "a apple red shiny big", "a apple big shiny red"]
    assert axes[0].label(1) == "red, apple, big" and cells[0].request["negative_prompt"] == BASE["negative_prompt"]
    with pytest.raises(InvalidRequest, match="'pear' is not in the prompt"):
        plan(BASE | {"prompt": "a big red apple"}, [read_axis("X", "Prompt order", "red, pear"), axes[1], axes[2]])
    with pytest.raises(InvalidRequest, match="5 words make 120 orders"):
        read_axis("X", "Prompt order", "a, b, c, d, e")


def test_the_rng_source_and_beta_schedule_axes_set_their_fields():
    axes = [read_axis("X", "RNG source", "CPU, GPU, NV"), read_axis("Y", "Beta schedule alpha", "0.3, 0.9"),
            read_axis("Z", "Beta schedule beta", "0.5")]
    cells = plan(BASE | {"scheduler": "Beta", "sampler_name": "Euler"}, axes).cells
    assert [parse_request(c.request).randn_source for c in cells[:3]] == ["CPU", "NV", "NV"]  # A1111's GPU is NV
    assert [(c.request["beta_dist_alpha"], c.request["beta_dist_beta"]) for c in cells[::3]] == [(0.3, 0.5), (0.9, 0.5)]
    assert axes[0].label(1) == "RNG source: GPU"
    weights = plan(BASE, [read_axis("X", "Cond. Image Mask Weight", "0.25, 1"), read_axis("Y", "Nothing", ""),
                          read_axis("Z", "Nothing", "")]).cells
    assert [c.request["inpainting_mask_weight"] for c in weights] == [0.25, 1.0]
    assert xyz_plot.AXIS_TYPES["Cond. Image Mask Weight"].tab == "img2img"  # A1111's, for img2img only
    with pytest.raises(InvalidRequest, match="X value 'RNG source: TPU'"):
        plan(BASE, [read_axis("X", "RNG source", "TPU"), read_axis("Y", "Nothing", ""), read_axis("Z", "Nothing", "")])


@pytest.mark.parametrize("axis_type, text, says", [
    ("Steps", "2, 0", "X value 'Steps: 0': .*steps"),
    ("Sampler", "Euler, Eulr", "X value 'Eulr': .*sampler"),
    ("Size", "64x64, 64 by 64", "X value 'Size: 64 by 64': '64 by 64' is no size"),
    ("Size", "64x64, 500x64", "width"),
])
def test_a_combination_that_is_no_valid_request_is_named_before_anything_runs(axis_type, text, says):
    axes = [read_axis("X", axis_type, text), read_axis("Y", "Nothing", ""), read_axis("Z", "Nothing", "")]
    with pytest.raises(InvalidRequest, match=says):
        plan(BASE, axes)


def test_a_combination_is_checked_whole_and_named_by_all_its_values():
    """Karras with DPM++ 2M is a pair; with DDIM it is not: the check waits for both axes."""
    axes = [read_axis("X", "Schedule type", "Karras"), read_axis("Y", "Sampler", "DPM++ 2M"), read_axis("Z", "Nothing", "")]
    assert plan(BASE | {"sampler_name": "DDIM"}, axes).cells[0].request["scheduler"] == "Karras"
    axes[1] = read_axis("Y", "Sampler", "DPM++ 2M, DDIM")
    with pytest.raises(InvalidRequest, match="X value 'Karras', Y value 'DDIM': "):
        plan(BASE, axes)
    with pytest.raises(InvalidRequest, match=r"^steps"):  # wrong whatever the axes say: said plainly
        plan(BASE | {"steps": 0}, axes)


def test_a_random_seed_on_a_seed_axis_is_picked_once_and_shown():
    axes = [read_axis("X", "Steps", "1, 2"), read_axis("Y", "Seed", "-1, 7"), read_axis("Z", "Nothing", "")]
    made = plan(BASE, axes)
    seeds = {cell.request["seed"] for cell in made.cells if cell.y == 0}
    assert len(seeds) == 1 and -1 not in seeds and made.axes[1].label(0) == f"Seed: {seeds.pop()}"
    assert {cell.request["seed"] for cell in plan(BASE, axes, keep_random_seeds=True).cells if cell.y == 0} == {-1}


def test_the_checkpoint_axis_changes_slowest_as_the_plot_runs():
    axes = [read_axis("X", "Checkpoint name", "a, b"), read_axis("Y", "Steps", "1, 2"), read_axis("Z", "Nothing", "")]
    cells = plan(BASE, axes).cells
    assert [(c.request["model"], c.request["steps"]) for c in cells] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]


def test_a_plot_of_too_many_combinations_is_refused():
    axes = [read_axis(name, "Steps", "1-8") for name in ("X", "Y", "Z")]
    with pytest.raises(InvalidRequest, match=f"512 combinations; at most {MAX_PLOT_CELLS}"):
        plan(BASE, axes)


# --- the grid --------------------------------------------------------------------------------

COLOURS = {(0, 0): (255, 0, 0), (1, 0): (0, 255, 0), (0, 1): (0, 0, 255), (1, 1): (255, 255, 0)}


def test_the_grid_puts_each_picture_in_its_cell_with_the_values_around_it():
    pictures = {where: Image.new("RGB", (64, 48), colour) for where, colour in COLOURS.items()}
    x, y = read_axis("X", "Steps", "10, 20"), read_axis("Y", "Sampler", "Euler a, DDIM")
    bare = draw_grid(pictures, x, y, legend=False)
    assert bare.size == (128, 96)
    for (i, j), colour in COLOURS.items():
        assert bare.getpixel((i * 64 + 32, j * 48 + 24)) == colour
    grid = np.asarray(draw_grid(pictures, x, y, title="Clip skip: 2"))
    height, width = grid.shape[:2]
    left, top = width - 128, height - 96  # the labels take a band above and one on the left
    assert left > 0 and top > 0
    for (i, j), colour in COLOURS.items():
        assert tuple(grid[top + j * 48 + 24, left + i * 64 + 32]) == colour
    assert (grid[:top, left:] < 128).any() and (grid[top:, :left] < 128).any()  # text in both bands
    assert (grid[:top, :left] == 255).all()  # the corner stays empty


def test_long_labels_stay_in_their_own_row_and_column():
    pictures = {(i, j): Image.new("RGB", (64, 64), "grey") for i in range(2) for j in range(2)}
    x = read_axis("X", "Sampler", f"{'W' * 40}, a")
    y = read_axis("Y", "Sampler", f"{'word ' * 16}, b")
    grid = np.asarray(draw_grid(pictures, x, y))
    height, width = grid.shape[:2]
    left, top = width - 128, height - 128  # the labels never make the grid taller than its bands
    assert (grid[top + 64:top + 80, :left] == 255).all()  # row 1's band above its own "b": nothing spilled
    assert (grid[:top, left + 64:left + 80] == 255).all()  # column 1's band left of its "a": nothing spilled


def test_a_huge_grid_is_scaled_down_to_stay_readable(monkeypatch):
    monkeypatch.setattr(xyz_plot, "MAX_GRID_PIXELS", 20_000)
    pictures = {(i, 0): Image.new("RGB", (128, 128), "red") for i in range(3)}
    grid = draw_grid(pictures, read_axis("X", "Steps", "1, 2, 3"), read_axis("Y", "Nothing", ""))
    assert grid.width * grid.height <= 20_000 and grid.getpixel((grid.width - 5, grid.height - 5)) == (255, 0, 0)


def test_a_missing_picture_leaves_its_cell_white():
    pictures = {(0, 0): Image.new("RGB", (64, 64), "red")}
    grid = draw_grid(pictures, read_axis("X", "Steps", "1, 2"), read_axis("Y", "Nothing", ""), legend=False)
    assert grid.size == (128, 64) and grid.getpixel((96, 32)) == (255, 255, 255)


# --- a plot from the txt2img tab ---------------------------------------------------------------------

def test_both_tabs_hand_the_plot_settings_to_generate(ui):
    for kind in ("txt2img", "img2img"):
        labels = input_labels(ui, kind)
        assert [labels[name] for name in ("xyz_plot", "x_type", "x_values", "z_values", "xyz_legend",
                                          "xyz_keep_random_seeds")] == [
            "X/Y/Z plot", "X type", "X values", "Z values", "Draw legend", "Keep -1 for seeds"]
        choices = [choice[0] for choice in getattr(ui, kind).widgets["y_type"].choices]
        assert choices[:2] == ["Nothing", "Seed"]
        hires_axes = [label for label in ("Hires steps", "Hires sampler", "Hires upscaler") if label in choices]
        assert hires_axes == (["Hires steps", "Hires sampler", "Hires upscaler"] if kind == "txt2img" else [])


def plot(ui, **fields) -> list:
    return list(event(ui, "txt2img")(Session(), "a lighthouse", steps=2, width=64, height=64, seed=11, model=TINY,
                                     xyz_plot=True, **fields))


def test_a_plot_runs_each_combination_and_shows_the_saved_grid_first(ui, ui_services):
    *running, (session, gallery, progress, _, infotext, timing) = plot(
        ui, x_type="Steps", x_values="1, 2", y_type="CFG Scale", y_values="3", xyz_sub_images=True)
    assert any("X/Y/Z plot: picture 2 of 2" in str(update[2]) for update in running)
    assert progress == "" and "for 2 runs" in timing
    (grid_path, _), *cells = gallery
    assert Path(grid_path).parent.parent.name == "txt2img-grids" and len(cells) == 2
    assert Path(grid_path).name.startswith("xyz_grid-")  # A1111's name for the plot's grid
    assert infotext == session.infotexts[0] and "Steps: 1" in infotext and "CFG scale: 3" in infotext
    assert [text.split("Steps: ")[1].split(",")[0] for text in session.infotexts[1:]] == ["1", "2"]
    assert len(set(session.seeds)) == 1  # one seed for all: the pictures differ by the steps alone
    with Image.open(grid_path) as saved:
        assert saved.info["parameters"] == infotext
        grid = np.asarray(saved.convert("RGB"))
    for i, (path, _) in enumerate(cells):  # each cell's picture sits in the grid's bottom row, as saved
        with Image.open(path) as picture:
            cell = np.asarray(picture.convert("RGB"))
        height, width = grid.shape[:2]
        assert np.array_equal(grid[height - 64:, width - 128 + i * 64:width - 128 + (i + 1) * 64], cell)


def test_a_z_axis_shows_the_grid_of_all_z_values_first_and_theirs_with_include_sub_grids(ui, ui_services):
    """As A1111's: the Z values' grids side by side, then each Z value's own where Include sub grids asks."""
    axes = {"x_type": "Steps", "x_values": "1, 2", "z_type": "CFG Scale", "z_values": "3, 7"}
    *_, (session, gallery, progress, *_) = plot(ui, **axes)
    assert progress == "" and len(gallery) == 1
    with Image.open(gallery[0][0]) as combined:
        width, height = combined.size
    *_, (session, gallery, progress, *_) = plot(ui, xyz_sub_grids=True, **axes)
    assert len(gallery) == 3
    sizes = []
    for path, _ in gallery:
        with Image.open(path) as grid:
            sizes.append(grid.size)
    assert sizes[0] == (width, height) and sizes[1] == sizes[2] and sizes[1][0] * 2 <= width
    labels = input_labels(ui, "txt2img")
    assert labels["xyz_sub_grids"] == "Include sub grids"


def test_the_grids_infotext_names_the_plot_and_pasting_it_sets_the_plot_again(ui, ui_services):
    from webui.ui.params import IMG2IMG_FIELDS, TXT2IMG_FIELDS

    *_, (session, gallery, progress, _, infotext, _) = plot(ui, x_type="Steps", x_values="1, 2", y_type="Seed",
                                                             y_values="-1")
    assert progress == "" and infotext == session.infotexts[0]
    seed = session.seeds[0]
    assert infotext.endswith(f'Script: X/Y/Z plot, X Type: Steps, X Values: "1, 2", Y Type: Seed, Y Values: -1, '
                             f"Fixed Y Values: {seed}")
    with Image.open(gallery[0][0]) as saved:
        assert saved.info["parameters"] == infotext
    fields = dict(zip(TXT2IMG_FIELDS, event(ui, "send_from_pnginfo")(infotext)))
    assert (fields["xyz_plot"], fields["x_type"], fields["x_values"], fields["y_type"], fields["y_values"],
            fields["z_type"], fields["z_values"]) == (True, "Steps", "1, 2", "Seed", str(seed), "Nothing", "")
    single = dict(zip(TXT2IMG_FIELDS, event(ui, "send_from_pnginfo")(infotext.split(", Script:")[0])))
    assert single["xyz_plot"] is False  # any other picture's parameters switch the plot off, as A1111's paste
    hires = infotext.replace("X Type: Steps", "X Type: Hires steps")
    fields = dict(zip(IMG2IMG_FIELDS, event(ui, "paste_into_img2img")(hires, Session())[:-1]))
    assert fields["xyz_plot"] is True and fields["x_type"] == "Nothing"  # img2img has no hires axes
    # One script at a time, as Generate runs them: the others' switches go off.
    assert (fields["loopback"], fields["sd_upscale"], fields["prompt_matrix"]) == (False, False, False)
    pasted = dict(zip(TXT2IMG_FIELDS, event(ui, "send_from_pnginfo")(infotext)))
    assert pasted["xyz_plot"] is True and pasted["prompt_matrix"] is False and pasted["prompt_list"] is False


def test_a_plot_value_that_cannot_run_is_named_and_nothing_is_queued(ui, ui_services):
    jobs = len(ui_services.worker.waiting_jobs())
    [(session, _, progress, *_)] = plot(ui, x_type="Steps", x_values="2, 0")
    progress = html.unescape(progress)
    assert "X value 'Steps: 0'" in progress and "dw-error" in progress and session.job_id is None
    assert len(ui_services.worker.waiting_jobs()) == jobs
    [(_, _, progress, *_)] = plot(ui, x_type="Checkpoint name", x_values=f"{TINY}, no-such-model")
    assert "there is no model 'no-such-model'" in html.unescape(progress)
    # What only the worker checks (the model's text encoder has 3 layers) is found before anything runs too.
    [(session, _, progress, *_)] = plot(ui, x_type="Clip skip", x_values="1, 5")
    assert "X value 'Clip skip: 5'" in html.unescape(progress) and session.job_id is None
    assert len(ui_services.worker.waiting_jobs()) == jobs


def test_interrupt_ends_the_plot_without_a_grid(ui, ui_services):
    updates = event(ui, "txt2img")(Session(), "a long one", steps=150, width=64, height=64, seed=1, model=TINY,
                                   xyz_plot=True, x_type="Seed", x_values="1, 2, 3")
    session = next(updates)[0]
    ui_services.worker.cancel(session.job_id)
    *_, (session, gallery, progress, *_rest) = list(updates)
    assert ui_services.worker.get(session.job_id).state is JobState.CANCELLED
    assert "Interrupted" in progress and "picture 1 of 3" in progress
    assert not any("txt2img-grids" in str(item[0]) for item in (gallery if isinstance(gallery, list) else []))


def test_interrupt_between_two_pictures_starts_no_more(ui, ui_services, monkeypatch):
    """Interrupt pressed after one picture ended and before the next was queued (here: while it is being queued):
    the plot stops there, and what was queued is cancelled before it draws anything."""
    session, submitted = Session(), []
    submit = ui_services.worker.submit

    def interrupted_before_the_second(request, **kwargs):
        if submitted:
            ui.txt2img.actions.interrupt(session)
        submitted.append(submit(request, **kwargs))
        return submitted[-1]

    monkeypatch.setattr(ui_services.worker, "submit", interrupted_before_the_second)
    updates = event(ui, "txt2img")(session, "between", steps=1, width=64, height=64, seed=1, model=TINY,
                                   xyz_plot=True, x_type="Seed", x_values="1, 2, 3")
    *_, (session, gallery, progress, *_) = list(updates)
    assert len(submitted) == 2 and submitted[0].state is JobState.DONE
    assert submitted[1].state is JobState.CANCELLED and not submitted[1].images
    assert "Interrupted" in progress and "picture 2 of 3" in progress
    assert not any("txt2img-grids" in str(item[0]) for item in (gallery if isinstance(gallery, list) else []))


def test_a_plot_goes_on_when_its_page_is_closed_and_a_reloaded_page_shows_its_end(ui, ui_services):
    """As A1111's scripts run on the server: the page's generator is closed when the browser goes (a reload, a
    closed tab); the plot runs to its end all the same, grid saved, and the tab's reloaded page shows it."""
    session = Session(tab="tab-closed-mid-plot")
    updates = event(ui, "txt2img")(session, "closed page", steps=1, width=64, height=64, seed=1, model=TINY,
                                   xyz_plot=True, x_type="Seed", x_values="1, 2, 3")
    next(updates)
    updates.close()  # what Gradio does when the browser disconnects
    run = ui.txt2img.actions.run_of("ui-tab:tab-closed-mid-plot")
    assert run is not None and run.ended.wait(120) and run.finished
    again = Session()
    *_, (again, gallery, progress, *_) = list(ui.txt2img.actions.resume(again, "tab-closed-mid-plot"))
    grid_path = gallery[0][0]
    assert Path(grid_path).parent.parent.name == "txt2img-grids" and Path(grid_path).exists()
    assert len(run.jobs) == 3 and again.seeds[0] == 1
    assert ui.txt2img.actions.run_of("ui-tab:tab-closed-mid-plot") is None  # its end is shown once
    nothing = list(ui.txt2img.actions.resume(Session(), "tab-closed-mid-plot"))
    assert len(nothing) == 1 and nothing[0][1:3] == (gr.skip(), gr.skip())


def test_a_bug_while_preparing_a_run_ends_as_a_message(ui, monkeypatch):
    """A raised error would leave Generate greyed out (the events after it never run)."""
    def broken(*args, **kwargs):
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(xyz_plot.csv, "reader", broken)
    [(_, _, progress, *_)] = plot(ui, x_type="Steps", x_values="1, 2")
    assert "The run could not start: something unforeseen" in progress


def test_a_plots_grid_is_named_by_its_first_pictures_prompt_and_seed(tmp_path):
    """As A1111 saves it: the folder and file patterns read the first picture's prompt and seed (an empty Directory
    name pattern, A1111's [prompt_words], made a folder named 'empty')."""
    from webui.runs import saved_grids
    from webui.schemas import GeneratedImage
    from webui.storage.options import OptionsStore
    from webui.storage.outputs import OutputStore

    options = OptionsStore(None)
    options.update({"directories_filename_pattern": ""})
    grid = GeneratedImage(Image.new("RGB", (128, 64)), 11, 0, "a lighthouse at dusk\nSteps: 2, Seed: 11, Size: 64x64")
    (saved,) = saved_grids([grid], OutputStore(tmp_path, options), "txt2img")
    assert Path(saved.path).parent == tmp_path / "txt2img-grids" / "a lighthouse at dusk"
    # named as A1111 names each script's grids, each name numbered on its own
    names = [Path(saved_grids([grid], OutputStore(tmp_path, options), "txt2img", what=what)[0].path).name
             for what in ("", "Prompt matrix", xyz_plot.SCRIPT, xyz_plot.SCRIPT)]
    assert names == ["grid-0001.png", "prompt_matrix-0000.png", "xyz_grid-0000.png", "xyz_grid-0001.png"]


def test_a_run_no_page_comes_back_for_is_let_go_of(ui, ui_services, monkeypatch):
    """It holds every picture it made: kept only a while after its end (was: until the next run started)."""
    from tests.helpers import wait_for

    monkeypatch.setattr("webui.ui.several_runs.FORGET_ENDED_RUNS_AFTER", 0.2)
    updates = event(ui, "txt2img")(Session(tab="tab-never-back"), "left alone", steps=1, width=64, height=64, seed=1,
                                   model=TINY, xyz_plot=True, x_type="Seed", x_values="1, 2")
    next(updates)
    updates.close()
    run = ui.txt2img.actions.run_of("ui-tab:tab-never-back")
    assert run is not None and run.ended.wait(120)
    wait_for(lambda: ui.txt2img.actions.run_of("ui-tab:tab-never-back") is None, what="the run to be let go of")


SMALL_PLOT = dict(steps=1, width=64, height=64, seed=1, model=TINY, xyz_plot=True, x_type="Seed", x_values="1, 2")


def test_a_run_whose_end_was_shown_is_let_go_of_at_once(ui):
    """The thread that lets go of unseen runs held each run itself for 10 minutes past its end, and with it every
    picture its jobs made, past the worker's bound on finished pictures. Found by review."""
    import gc
    import weakref

    updates = event(ui, "txt2img")(Session(tab="tab-end-shown"), "shown", **SMALL_PLOT)
    next(updates)
    run = weakref.ref(ui.txt2img.actions.run_of("ui-tab:tab-end-shown"))
    *_, (session, gallery, *_) = list(updates)
    assert "txt2img-grids" in str(gallery[0][0]) and ui.txt2img.actions.run_of("ui-tab:tab-end-shown") is None
    del updates
    gc.collect()
    assert run() is None, "the shown run and its jobs are still held"


def test_a_grid_that_cannot_be_made_is_said_to_fail_at_the_runs_end(ui, monkeypatch):
    """An error drawing or saving the grid was worded as a job past the last that could not be queued: 'X/Y/Z plot:
    picture 3 of 2'. Found by review."""
    def broken(*args, **kwargs):
        raise ValueError("the grid is too large to draw")

    monkeypatch.setattr("webui.ui.several_runs.plot_grids", broken)
    *_, (session, gallery, progress, *_) = list(event(ui, "txt2img")(Session(tab="tab-grid-fails"), "grid",
                                                                     **SMALL_PLOT))
    text = html.unescape(progress)
    assert "the grid is too large to draw" in text and "the end of its 2 pictures" in text, text
    assert "picture 3 of 2" not in text


def test_a_reloaded_page_follows_the_tabs_new_job_not_an_earlier_runs_unseen_end(ui, ui_services):
    """The page lost its stream during a plot (the generator closed, the page stayed), the plot ended unseen, then
    the tab ran a plain Generate. A reload showed the plot's end instead of following the new job, and its
    Interrupt could not reach that job. Found by review."""
    session = Session(tab="tab-stale-run")
    updates = event(ui, "txt2img")(session, "plot", **SMALL_PLOT)
    next(updates)
    updates.close()
    run = ui.txt2img.actions.run_of("ui-tab:tab-stale-run")
    assert run.ended.wait(120) and run.finished
    single = event(ui, "txt2img")(session, "a long one", steps=150, width=128, height=128, seed=3, model=TINY)
    next(single)
    job = ui_services.worker.get(session.job_id)
    try:
        reloaded = Session()
        next(iter(ui.txt2img.actions.resume(reloaded, "tab-stale-run")))
        ui.txt2img.actions.interrupt(reloaded)
        assert reloaded.job_id == job.id and job.cancel_event.is_set()
    finally:
        ui_services.worker.cancel(job.id)
        single.close()
        job.wait(60)
