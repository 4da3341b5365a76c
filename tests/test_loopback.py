"""Loopback (webui/loopback.py, and the img2img tab's runs of it)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import TINY
# ui_services and ui: test_ui's module fixtures, started again for this module.
from tests.test_ui import event, ui, ui_services  # noqa: F401
from webui.engine.img2img import image_sha1
from webui.loopback import loop_mask, loop_requests, loop_strengths
from webui.schemas import InvalidRequest, JobState
from webui.ui.generation import Session


@pytest.mark.parametrize("curve, second", [
    ("Linear", 0.75 - 0.25 / 3),
    ("Aggressive", 0.75 - 0.25 * 0.5),  # sin(30 degrees): half the way after a third of the loops
    ("Lazy", 0.75 - 0.25 * (1 - 3 ** 0.5 / 2)),  # 1 - cos(30 degrees)
])
def test_the_strength_moves_from_the_runs_own_to_the_final_one_along_the_curve(curve, second):
    strengths = loop_strengths(0.75, 0.5, 4, curve)
    assert strengths[0] == 0.75 and strengths[-1] == pytest.approx(0.5) and len(strengths) == 4
    assert strengths[1] == pytest.approx(second)
    assert loop_strengths(0.6, 0.2, 1, curve) == [0.6]


def test_each_loop_takes_the_next_seed_and_each_batch_count_is_a_chain_that_goes_on_counting():
    chains = loop_requests({"prompt": "x", "seed": 100, "n_iter": 2, "denoising_strength": 0.8}, 3, 0.2, "Linear")
    assert [[r["seed"] for r in chain] for chain in chains] == [[100, 101, 102], [103, 104, 105]]
    assert all(r["n_iter"] == 1 for chain in chains for r in chain)
    assert [r["denoising_strength"] for r in chains[1]] == pytest.approx([0.8, 0.5, 0.2])
    picked = loop_requests({"prompt": "x", "seed": -1}, 2, 0.5, "Lazy")[0]
    assert picked[0]["seed"] >= 0 and picked[1]["seed"] == picked[0]["seed"] + 1  # one random seed for all


def test_inpainting_loops_after_the_first_start_from_the_picture_and_the_variation_seed_is_picked_once():
    [chain] = loop_requests({"prompt": "x", "seed": 5, "subseed": -1, "subseed_strength": 0.3, "inpainting_fill": 0},
                            3, 0.5, "Linear")
    assert [r["inpainting_fill"] for r in chain] == [0, 1, 1]  # fill, then original (A1111's loopback)
    assert len({r["subseed"] for r in chain}) == 1 and chain[0]["subseed"] >= 0


def test_the_mask_of_later_loops_is_the_first_loops_as_its_resize_mode_fitted_it():
    mask = Image.new("L", (128, 64))
    mask.paste(255, (64, 0, 96, 64))
    picture = Image.new("RGB", (128, 64), "grey")
    cropped = np.asarray(loop_mask(mask, picture, {"width": 64, "height": 64, "resize_mode": 1}))  # Crop and resize
    assert cropped.shape == (64, 64) and (cropped[:, 33:63] == 255).all() and (cropped[:, :31] == 0).all()
    assert loop_mask(mask, picture, {"inpaint_full_res": True}) is mask  # Only masked keeps the picture's size


def test_a_skipped_loop_goes_on_from_its_picture_and_one_without_a_picture_ends_the_loops():
    from webui.schemas import GeneratedImage
    from webui.runs import last_picture as _last_picture

    made = GeneratedImage(image=Image.new("RGB", (8, 8)), seed=1, index=0, infotext="", path=None)
    assert _last_picture([[made]]) is made.image
    cut_short = GeneratedImage(image=Image.new("RGB", (8, 8), "red"), seed=1, index=0, infotext="", path=None,
                               unfinished=True)
    assert _last_picture([[made], [cut_short]]) is cut_short.image  # as A1111: Skip ends that loop, not the run
    with pytest.raises(InvalidRequest, match="skipped before it made a picture"):
        _last_picture([[made], []])


@pytest.mark.parametrize("changes, loops, curve, message", [
    ({"batch_size": 2}, 4, "Linear", "Batch size to 1"),
    ({}, 0, "Linear", "Loops"),
    ({}, 4, "Wavy", "Denoising strength curve"),
])
def test_what_loopback_cannot_run_says_what_to_change(changes, loops, curve, message):
    with pytest.raises(InvalidRequest, match=message):
        loop_requests({"prompt": "x"} | changes, loops, 0.5, curve)


def test_the_img2img_tab_starts_each_loop_from_the_picture_the_loop_before_made(ui, ui_services, monkeypatch):
    worker, submitted = ui_services.worker, []
    submit = worker.submit

    def recorded_submit(request, **kwargs):
        submitted.append(submit(request, **kwargs))
        return submitted[-1]

    monkeypatch.setattr(worker, "submit", recorded_submit)
    start = Image.new("RGB", (64, 64), "red")
    ImageDraw.Draw(start).ellipse((10, 10, 40, 40), fill="blue")
    updates = list(event(ui, "img2img")(Session(), "a red barn", steps=3, width=64, height=64, seed=40, model=TINY,
                                        init_image=start, denoising_strength=0.6, loopback=True, loopback_loops=3,
                                        loopback_final_strength=0.3, loopback_curve="Linear"))
    session, gallery, *_ = updates[-1]
    assert len(gallery) == 3 and [job.state for job in submitted] == [JobState.DONE] * 3
    assert [job.request.seed for job in submitted] == [40, 41, 42]
    assert [job.request.denoising_strength for job in submitted] == pytest.approx([0.6, 0.45, 0.3])
    assert submitted[0].request.init_image == image_sha1(start)
    for before, job in zip(submitted, submitted[1:]):  # each starts from the picture the one before made
        assert job.request.init_image == image_sha1(before.images[0].image)
    assert session.seeds == [40, 41, 42]  # all the loops shown, in turn
    # A1111's Loopback keys, in every loop's infotext
    assert all("Final denoising strength: 0.3, Denoising curve: Linear" in job.images[0].infotext for job in submitted)


def test_only_the_keys_scripts_write_go_into_the_infotext():
    from webui.schemas import parse_request

    with pytest.raises(InvalidRequest, match="script_params: .*unknown keys 'Steps'"):
        parse_request({"prompt": "x", "script_params": {"Steps": 99}})
    for bad in ("a\x00b", "two\nlines", "x" * 101, True):
        with pytest.raises(InvalidRequest, match="Denoising curve"):
            parse_request({"prompt": "x", "script_params": {"Denoising curve": bad}})


def test_the_tab_offers_clip_interrogation_and_refuses_without_its_models(ui, ui_services, monkeypatch):
    monkeypatch.setattr(ui_services.engine.interrogator, "downloads", False)  # and the models folder has no BLIP/
    [wiring] = [fn for fn in ui.blocks.fns.values() if fn.api_name == "img2img"]
    assert "img2img_loopback_interrogation" in [block.elem_id for block in wiring.inputs]
    updates = list(event(ui, "img2img")(Session(), "a red barn", steps=1, width=64, height=64, seed=40, model=TINY,
                                        init_image=Image.new("RGB", (64, 64), "red"), loopback=True,
                                        loopback_loops=2, loopback_interrogation="CLIP"))
    assert "Interrogate needs the captioning model (BLIP)" in updates[-1][2]


def test_colour_correction_matches_every_loop_to_the_runs_picture_not_the_loops_start(ui, ui_services, monkeypatch):
    # A1111's Loopback sets its colour correction up once, from the run's picture: later loops are matched to it too,
    # so a cast cannot build up from loop to loop.
    import webui.engine.generate as generate

    references, match = [], generate.match_colors

    def recorded_match(picture, reference):
        references.append(np.asarray(reference.convert("RGB")).copy())
        return match(picture, reference)

    monkeypatch.setattr(generate, "match_colors", recorded_match)
    start = Image.new("RGB", (64, 64), (40, 60, 200))
    ImageDraw.Draw(start).ellipse((10, 10, 40, 40), fill=(230, 200, 30))
    updates = list(event(ui, "img2img")(Session(), "a blue barn", steps=2, width=64, height=64, seed=7, model=TINY,
                                        init_image=start, denoising_strength=0.6, loopback=True, loopback_loops=3,
                                        loopback_final_strength=0.5, loopback_curve="Linear", color_correction=True))
    assert len(updates[-1][1]) == 3
    assert len(references) == 3
    assert all(np.array_equal(reference, np.asarray(start)) for reference in references)
