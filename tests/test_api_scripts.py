"""A1111's scripts on /sdapi/v1/txt2img and img2img (script_name and positional script_args), in-process against the
tiny model: the X/Y/Z plot, the prompt matrix, prompts from a list, Loopback and poor man's outpainting; what each
returns, that its jobs really differ as asked, /progress and /interrupt over a run of several jobs, and each refusal
(422 naming script_args[i], nothing queued)."""
import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from webui.api import create_api_app
from webui.runs import SeveralJobs, Submission
from webui.schemas import JobState
from webui.storage.outputs import read_infotext
from tests.helpers import noise_picture, running_services, wait_for

QUICK = {"prompt": "a red apple", "steps": 1, "seed": 10, "width": 64, "height": 64, "sampler_name": "Euler"}
STEPS, SEED, SAMPLER, DENOISING = 4, 1, 9, 24  # A1111's axis indexes (Sampler: txt2img's; Denoising: img2img's)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.int16)


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    yield from running_services(models_dir, tmp_path_factory.mktemp("api-scripts-out"))


@pytest.fixture(scope="module")
def client(services):
    with TestClient(create_api_app(services)) as test_client:
        yield test_client


@pytest.fixture
def submitted(services, monkeypatch):
    """The requests the worker was given to queue from here on, each with the picture it starts from."""
    requests, submit = [], services.worker.submit

    def counted(request, *args, **kwargs):
        requests.append((request, kwargs.get("init_image")))
        return submit(request, *args, **kwargs)

    monkeypatch.setattr(services.worker, "submit", counted)
    return requests


def run(client, body: dict, kind: str = "txt2img") -> tuple[dict, dict]:
    r = client.post(f"/sdapi/v1/{kind}", json=body)
    assert r.status_code == 200, r.text
    return r.json(), json.loads(r.json()["info"])


def refused(client, body: dict, kind: str = "txt2img") -> str:
    r = client.post(f"/sdapi/v1/{kind}", json=body)
    assert r.status_code == 422, r.text
    return r.json()["detail"]


def param(infotext: str, key: str) -> str:
    return dict(pair.split(": ", 1) for pair in infotext.splitlines()[-1].split(", ") if ": " in pair)[key]


# --- X/Y/Z plot -------------------------------------------------------------------------------------------------
def test_a_plot_returns_its_grid_then_each_cell_in_grid_order(client, submitted):
    """Steps across, seeds down (by A1111's indexes), no legend: a 2x2 grid of the cells' own pictures."""
    body, info = run(client, QUICK | {"script_name": "X/Y/Z plot", "script_args": [
        STEPS, "1, 2", [], SEED, "10, 20", [], 0, "", [], False, True]})  # no legend; include sub images
    grid, *cells = [png(image) for image in body["images"]]
    assert len(submitted) == len(cells) == 4 and grid.size == (128, 128)
    assert info["index_of_first_image"] == 1 and len(info["infotexts"]) == 5
    assert [param(text, "Steps") for text in info["infotexts"][1:]] == ["1", "2", "1", "2"]
    assert info["all_seeds"] == [10, 10, 20, 20]
    assert [read_infotext(cell) for cell in cells] == info["infotexts"][1:]
    for number, cell in enumerate(cells):  # each cell where the grid puts it
        x, y = number % 2 * 64, number // 2 * 64
        assert np.array_equal(pixels(grid.crop((x, y, x + 64, y + 64))), pixels(cell))
    assert np.abs(pixels(cells[0]) - pixels(cells[2])).mean() > 1  # another seed, another picture
    grid_infotext = info["infotexts"][0]
    assert param(grid_infotext, "Script") == "X/Y/Z plot" and param(grid_infotext, "X Type") == "Steps"
    assert param(grid_infotext, "Y Type") == "Seed"


def test_a_styles_axis_by_a1111s_index_and_dropdown_list_joins_each_style(client, services):
    from webui.storage.styles import Style

    services.styles.save(Style("Film", "{prompt}, film grain", "blurry"))
    styles_index = 30  # "Styles" in A1111 1.10's txt2img axis list
    body, info = run(client, QUICK | {"script_name": "x/y/z plot", "script_args": [
        styles_index, "", ["Film"], 0, "", [], 0, "", [], True, True]})
    assert info["infotexts"][1].startswith("a red apple, film grain\nNegative prompt: blurry\n")


def test_an_rng_source_axis_by_a1111s_index_takes_its_dropdown_list(client):
    rng_index = 39  # "RNG source" in A1111 1.10's txt2img axis list
    _, info = run(client, QUICK | {"script_name": "x/y/z plot", "script_args": [
        rng_index, "", ["CPU", "GPU"], 0, "", [], 0, "", [], True, True]})
    assert [param(text, "RNG") for text in info["infotexts"][1:]] == ["CPU", "NV"]  # A1111's GPU is NV here


def test_a_plot_with_the_defaults_returns_its_labelled_grid_alone(client):
    """Only x_type and the dropdown's values given (the Sampler axis reads its list, as A1111's): the legend is
    drawn, the cells are not sent, but info labels them, as A1111's does."""
    body, info = run(client, QUICK | {"script_name": "x/y/z plot", "script_args": [SAMPLER, "", ["Euler", "Euler a"]]})
    [grid] = [png(image) for image in body["images"]]
    assert grid.width >= 128 and grid.height > 64  # with the labels above the cells
    assert [param(text, "Sampler") for text in info["infotexts"][1:]] == ["Euler", "Euler a"]
    assert info["all_seeds"] == [10, 10] and info["index_of_first_image"] == 1


def test_the_z_values_grids_come_side_by_side_first_then_each_with_sub_grids(client):
    args = [STEPS, "1, 2", [], 0, "", [], SEED, "3, 4", [], False, False, True]  # include sub grids
    body, info = run(client, QUICK | {"script_name": "x/y/z plot", "script_args": args})
    whole, *grids = [png(image) for image in body["images"]]
    assert [grid.size for grid in grids] == [(128, 64)] * 2 and whole.size == (256, 64)
    assert np.array_equal(pixels(whole.crop((128, 0, 256, 64))), pixels(grids[1]))
    assert info["all_seeds"] == [3, 3, 4, 4] and len(info["infotexts"]) == 3 + 4


def test_vary_seeds_along_an_axis_and_a_random_seed_picked_once(client):
    args = [STEPS, "1, 2", [], 0, "", [], 0, "", [], False, True, False, False, True]  # vary seeds for X
    _, info = run(client, QUICK | {"seed": -1, "script_name": "x/y/z plot", "script_args": args})
    first = info["all_seeds"][0]
    assert info["all_seeds"] == [first, first + 1]


def test_an_img2img_plot_runs_from_the_picture(client):
    body = QUICK | {"init_images": [b64(noise_picture(2))], "script_name": "x/y/z plot",
                    "script_args": [DENOISING, "0.5, 1", [], 0, "", [], 0, "", [], False, True]}
    response, info = run(client, body, "img2img")
    assert len(response["images"]) == 3 and png(response["images"][0]).size == (128, 64)
    assert [param(text, "Denoising strength") for text in info["infotexts"][1:]] == ["0.5", "1"]


@pytest.mark.parametrize("args, says", [
    ([40, "1, 2"], "script_args[0] (x type): the axis 'FP8 mode' is not on this server"),
    ([STEPS, "1", [], 40, "a, b"], "script_args[3] (y type): the axis 'FP8 mode' is not on this server"),
    ([99, "1"], "script_args[0] (x type): no axis 99; txt2img's axes are 0 to 41"),
    ([STEPS, "a, b"], "script_args[1] (x values): 'a' is no whole number"),
    ([SAMPLER, "Euler, Wobbly"], "Wobbly"),
    ([STEPS, "1-100"], "script_args[1] (x values): '1-100': more than 64 values"),
    ([STEPS, "1", [], 0, "", [], 0, "", [], "maybe"], "script_args[9] (draw legend): expected true or false"),
    ([11, "no-such-model"], "script_args[1] (x values): model 'no-such-model' not found"),
    ([10 ** 400, "1"], "script_args[0] (x type): no axis 1000000000"),  # beyond any float: no OverflowError, a 422
])
def test_a_plot_that_cannot_run_is_refused_before_any_job_naming_what_to_fix(client, submitted, args, says):
    assert says in refused(client, QUICK | {"script_name": "x/y/z plot", "script_args": args})
    assert submitted == []


def test_an_img2img_axis_on_txt2img_and_a_hires_one_on_img2img_are_refused(client):
    assert "script_args[0] (x type): no axis 'Image CFG Scale'" in refused(
        client, QUICK | {"script_name": "x/y/z plot", "script_args": ["Image CFG Scale", "1"]})
    body = QUICK | {"init_images": [b64(noise_picture(2))], "script_name": "x/y/z plot",
                    "script_args": ["hires steps", "1"]}
    assert "script_args[0] (x type): no axis 'hires steps'" in refused(client, body, "img2img")


def test_progress_follows_the_whole_plot_and_interrupt_ends_it(client, services, submitted):
    answer = {}
    body = QUICK | {"steps": 150, "script_name": "x/y/z plot", "script_args": [SEED, "1, 2, 3"]}
    caller = threading.Thread(target=lambda: answer.update(r=client.post("/sdapi/v1/txt2img", json=body)))
    caller.start()
    try:
        wait_for(lambda: services.worker.current() is not None and services.worker.current().progress.step >= 1)
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["state"]["job_count"] == 3 and progress["state"]["job_no"] == 0
        assert progress["textinfo"].startswith("X/Y/Z plot: picture 1 of 3") and 0 < progress["progress"] < 1 / 3
        assert client.post("/sdapi/v1/interrupt").json() == {}
    finally:
        caller.join(60)
    r = answer["r"]
    assert r.status_code == 200, r.text  # as A1111: what was made so far, here no grid from part of a plot
    info = json.loads(r.json()["info"])
    assert info["state"] == "cancelled" and info["index_of_first_image"] == 0 and len(submitted) == 1


def test_a_run_stopped_between_two_jobs_submits_no_more(services):
    run = SeveralJobs([Submission(QUICK), Submission(QUICK | {"seed": 11})], "test")
    jobs = run.in_turn(services.worker, "api")
    first = next(jobs)
    assert first.wait(60) and first.state is JobState.DONE
    run.stop(services.worker)
    assert list(jobs) == [] and run.jobs == [first] and not run.finished


# --- prompt matrix ----------------------------------------------------------------------------------------------
def test_the_prompt_matrix_returns_its_grid_then_every_combination(client, submitted):
    body = QUICK | {"prompt": "a fox|in snow|at night", "script_name": "Prompt matrix",
                    "script_args": [False, False, "positive", "space"]}
    response, info = run(client, body)
    grid, *cells = [png(image) for image in response["images"]]
    assert len(cells) == len(submitted) == 4 and grid.width > 128 and grid.height > 128  # labelled
    assert info["all_prompts"] == ["a fox", "a fox in snow", "a fox at night", "a fox in snow at night"]
    assert info["all_seeds"] == [10] * 4 and info["index_of_first_image"] == 1
    assert info["infotexts"][1:] == [read_infotext(cell) for cell in cells]


def test_the_prompt_matrix_combines_the_negative_prompt_with_random_seeds(client):
    body = QUICK | {"negative_prompt": "blur|noise", "script_name": "prompt matrix",
                    "script_args": [True, True, "negative"]}
    _, info = run(client, body)
    assert info["all_negative_prompts"] == ["blur", "noise, blur"] and info["all_seeds"] == [10, 11]
    assert "no parts to combine" in refused(client, QUICK | {"script_name": "prompt matrix"})


# --- prompts from a list ----------------------------------------------------------------------------------------
def test_prompts_from_a_list_run_each_line_with_its_options(client, submitted):
    body = QUICK | {"prompt": "", "script_name": "prompts from file or textbox",
                    "script_args": [False, False, "start", 'a red fox\n\n--prompt "a hare" --steps 2 --seed 7']}
    response, info = run(client, body)
    assert len(response["images"]) == len(submitted) == 2
    assert info["all_prompts"] == ["a red fox", "a hare"] and info["all_seeds"] == [10, 7]
    assert [param(text, "Steps") for text in info["infotexts"]] == ["1", "2"]
    assert info["index_of_first_image"] == 0


def test_prompts_from_a_list_iterate_the_seed_and_join_the_request_prompt(client):
    body = QUICK | {"prompt": "photo", "seed": 100, "n_iter": 2, "script_name": "prompts from file or textbox",
                    "script_args": [True, False, "end", "a fox\na hare"]}
    _, info = run(client, body)
    assert info["all_prompts"] == ["photo a fox"] * 2 + ["photo a hare"] * 2
    assert info["all_seeds"] == [100, 101, 102, 103]


@pytest.mark.parametrize("args, says", [
    ([False, False, "start", " \n "], "write one prompt"),
    ([False, False, "start", "a fox\n--steps ten"], "line 2: --steps 'ten' is no whole number"),
    ([False, False, "middle", "a fox"], "script_args[2] (insert prompts at the): expected one of start, end"),
    ([False, False, "start", "a fox\n--sampler_name Wobbly"], "line 2: "),
])
def test_a_list_that_cannot_run_is_refused_before_any_job(client, submitted, args, says):
    assert says in refused(client, QUICK | {"script_name": "prompts from file or textbox", "script_args": args})
    assert submitted == []


# --- img2img's scripts ------------------------------------------------------------------------------------------
def test_loopback_starts_each_loop_from_the_last_picture_and_returns_their_grid_first(client, submitted):
    body = QUICK | {"init_images": [b64(noise_picture(3))], "denoising_strength": 0.75, "script_name": "Loopback",
                    "script_args": [3, 0.25]}
    response, info = run(client, body, "img2img")
    grid, *loops = [png(image) for image in response["images"]]
    assert len(loops) == len(submitted) == 3 and grid.size == (192, 64)
    assert info["all_seeds"] == [10, 11, 12]
    assert [param(text, "Denoising strength") for text in info["infotexts"][1:]] == ["0.75", "0.5", "0.25"]
    assert param(info["infotexts"][1], "Denoising curve") == "Linear"
    for loop, (_, picture) in enumerate(submitted[1:]):  # each loop from the picture the loop before made
        assert np.array_equal(pixels(picture), pixels(loops[loop]))


def test_a_loopback_ended_by_a_skipped_loop_answers_with_the_loops_it_made(client, submitted, monkeypatch):
    import webui.runs as runs
    from webui.schemas import InvalidRequest

    def skipped(done):  # the second loop was skipped before it made a picture
        if len(done) == 2:
            raise InvalidRequest("Loopback: the last loop was skipped before it made a picture; the loops end "
                                 "here")
        return done[-1][0].image

    monkeypatch.setattr(runs, "last_picture", skipped)
    body = QUICK | {"init_images": [b64(noise_picture(3))], "script_name": "Loopback", "script_args": [4, 0.5]}
    response, info = run(client, body, "img2img")  # not a 422 that throws away what ran
    assert len(submitted) == 2 and len(response["images"]) == 3  # the two loops' grid, then each
    assert info["all_seeds"] == [10, 11]
    assert any("Loopback: ended after picture 2 of 4: Loopback: the last loop was skipped" in warning
               for warning in info["warnings"]), info["warnings"]


def test_a_script_that_cannot_queue_its_first_job_is_still_an_error(client, services, monkeypatch):
    from webui.worker import QueueFull

    def full(*args, **kwargs):
        raise QueueFull("the queue is full (4 jobs); try again later")

    monkeypatch.setattr(services.worker, "submit", full)
    body = QUICK | {"init_images": [b64(noise_picture(3))], "script_name": "Loopback", "script_args": [2, 0.5]}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 503 and "queue is full" in r.json()["detail"], r.text


def test_loopback_refuses_deepbooru_and_too_many_loops(client, submitted):
    body = QUICK | {"init_images": [b64(noise_picture(3))], "script_name": "loopback"}
    assert "script_args[3] (append interrogated prompt at each iteration): 'DeepBooru': send None or CLIP" in refused(
        client, body | {"script_args": [2, 0.5, "Linear", "DeepBooru"]}, "img2img")
    assert "script_args[0] (loops): 40 is out of range; use 1 to 32" in refused(
        client, body | {"script_args": [40]}, "img2img")
    assert submitted == []


def test_loopback_appends_what_interrogate_clip_says_of_each_loops_start_picture(client, services, submitted,
                                                                                  tmp_path):
    from tests.test_interrogate import save_tiny_blip, save_tiny_clip
    from webui.engine.interrogate import Interrogator

    save_tiny_blip(tmp_path / "BLIP")
    save_tiny_clip(tmp_path / "CLIP")
    kept, services.engine.interrogator = services.engine.interrogator, Interrogator(tmp_path / "BLIP",
                                                                                     tmp_path / "CLIP")
    try:
        body = QUICK | {"init_images": [b64(noise_picture(3))], "script_name": "loopback",
                        "script_args": [2, 0.5, "Linear", "clip"]}
        run(client, body, "img2img")
    finally:
        services.engine.interrogator = kept
    by_hand = Interrogator(tmp_path / "BLIP", tmp_path / "CLIP")
    assert len(submitted) == 2
    for request, start in submitted:  # the first loop's picture is the upload, the second's what the first made
        assert request["prompt"] == "a red apple, " + by_hand.describe(start, "cpu", torch.float32)


def test_poor_mans_outpainting_draws_a_larger_canvas(client):
    body = QUICK | {"init_images": [b64(noise_picture(4))], "script_name": "Poor man's outpainting",
                    "script_args": [32, 4, "latent noise", ["left", "right"]]}
    response, info = run(client, body, "img2img")
    [image] = [png(data) for data in response["images"]]
    assert image.size == (128, 64) and (info["width"], info["height"]) == (128, 64)
    assert param(info["infotexts"][0], "Mask blur") == "8"
    assert param(info["infotexts"][0], "Masked content") == "latent noise"
    assert "script_args[3] (outpainting direction): expected one of left, right, up, down" in refused(
        client, body | {"script_args": [32, 4, 0, ["sideways"]]}, "img2img")


def test_the_lists_of_scripts_and_their_args(client):
    assert client.get("/sdapi/v1/scripts").json() == {
        "txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot"],
        "img2img": ["loopback", "poor man's outpainting", "prompt matrix", "prompts from file or textbox",
                    "sd upscale", "soft inpainting", "x/y/z plot"]}
    info = {(item["name"], item["is_img2img"]): item["args"] for item in client.get("/sdapi/v1/script-info").json()}
    plot = info[("x/y/z plot", False)]
    assert len(plot) == 18 and plot[0]["label"] == "X type" and plot[0]["value"] == "Seed"
    assert plot[0]["choices"][STEPS] == "Steps" and info[("x/y/z plot", True)][0]["choices"][DENOISING] == "Denoising"
    assert [arg["value"] for arg in info[("loopback", True)]] == [4, 0.5, "Linear", "None"]
    assert info[("prompts from file or textbox", False)][3]["label"] == "List of prompt inputs"


def test_a_script_of_several_jobs_is_refused_on_the_job_routes(client, submitted):
    r = client.post("/api/v1/jobs", json=QUICK | {"script_name": "x/y/z plot", "script_args": [STEPS, "1, 2"]})
    assert r.status_code == 422 and "x/y/z plot runs several jobs; send it to /sdapi/v1/txt2img" in r.text
    assert submitted == []


def test_a_controlnet_unit_with_a_script_of_several_jobs_is_refused(client, submitted):
    unit = {"enabled": True, "image": b64(noise_picture(2)), "module": "none", "model": "canny [12345678]"}
    detail = refused(client, QUICK | {"script_name": "prompts from file or textbox", "script_args": [
        False, False, "start", "a\nb"], "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert "alwayson_scripts.controlnet: not with script_name 'prompts from file or textbox'" in detail
    assert submitted == []


def test_a_loop_cut_short_by_skip_is_among_the_loopback_pictures_it_went_on_from():
    from types import SimpleNamespace

    from webui.api.scripts import _loopback_result
    from webui.schemas import GeneratedImage

    def loop(colour: str, unfinished: bool = False) -> SimpleNamespace:
        image = GeneratedImage(image=Image.new("RGB", (8, 8), colour), seed=1, index=0, infotext="x", path=None,
                               unfinished=unfinished)
        return SimpleNamespace(images=[image])

    jobs = [loop("red"), loop("green", unfinished=True), loop("blue")]
    result = _loopback_result(SimpleNamespace(jobs=jobs, submissions=[None] * 3), loops=3)
    assert [image.image.getpixel((0, 0)) for _, image in result.made] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
    assert result.grids[0].image.size == (24, 8)  # the three side by side
