"""The web UI in-process: build the Blocks, call the event functions Gradio would call, check outcomes.

Generation runs for real on the tiny model (2-4 steps); long jobs that get interrupted use many
steps so there is time to act while they run. No assertion depends on wall-clock time.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from gradio.state_holder import SessionState

from tests.conftest import TINY
from tests.tiny_sd import TEXT_LAYERS as TINY_TEXT_LAYERS
from webui.config import Settings, parse_settings
from webui.engine.samplers import get_sampler
from webui.schemas import JobState
from webui.services import build_services
from webui.ui import history as history_module
from webui.ui.blocks import create_ui
from webui.ui.params import FIELD_LABELS, TXT2IMG_FIELDS, schedules_of
from webui.ui.generation import Session
from tests.helpers import running_services, wait_for

A1111_INFOTEXT = (
    "masterpiece, a castle on a hill\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 42, Size: 512x768, Model hash: 6ce0161689, "
    'Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Lora hashes: "detail: 1a2b3c, style: 4d5e6f", '
    "Version: v1.9.4"
)


# --- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def ui_services(models_dir, tmp_path_factory):
    yield from running_services(models_dir, tmp_path_factory.mktemp("ui") / "outputs", preview_every=2)


@pytest.fixture(scope="module")
def ui(ui_services):
    return create_ui(ui_services)


def event(ui, name: str):
    """The function Gradio runs for an event, found by api_name or (for private events) function name."""
    for block_fn in ui.blocks.fns.values():
        if block_fn.api_name == name or getattr(block_fn.fn, "__name__", None) == name:
            return block_fn.fn
    raise KeyError(name)


def generate(ui, session: Session | None = None, prompt="a lighthouse", steps=2, seed=-1, n_iter=1,
             batch_size=1, width=64, height=64, model=TINY, negative="", clip_skip=1):
    """Run the txt2img event to the end; returns every yielded tuple
    (session, gallery, progress, preview, infotext, time)."""
    session = session or Session()
    return list(event(ui, "txt2img")(session, prompt, negative, "Euler a", "Automatic", steps, 7.0, width, height,
                                     seed, n_iter, batch_size, clip_skip, model))


def selected(index: int) -> gr.SelectData:
    return gr.SelectData(None, {"index": index, "value": None, "selected": True})


def is_skip(value) -> bool:
    return value == gr.skip()




def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the page -------------------------------------------------------------------------------
def test_events_have_api_names(ui):
    names = {fn.api_name for fn in ui.blocks.fns.values()}
    assert {"txt2img", "interrupt", "skip", "reuse_seed", "random_seed", "count_tokens", "refresh_models",
            "load_model", "png_info", "history_search", "history_page", "history_delete"} <= names


def test_default_model_is_selected_and_sliders_follow_its_size(ui):
    assert ui.picker.dropdown.value == TINY
    width, height = ui.txt2img.widgets["width"], ui.txt2img.widgets["height"]
    assert width.value == 64 and height.value == 64
    assert width.step == 8 and height.step == 8


def test_embedded_default_model_is_selected_when_none_is_given(tmp_path):
    from webui.config import DEFAULT_MODEL_NAME
    from webui.ui.models import ModelActions

    services = build_services(Settings(outdir=tmp_path / "out", device="cpu"), load_model=False)
    try:
        actions = ModelActions(services)
        assert services.settings.ckpt == DEFAULT_MODEL_NAME and actions.current() == DEFAULT_MODEL_NAME
        assert "could not be loaded" in actions.status()  # not loaded here: the page says so in words
    finally:
        services.close()


def test_token_counter(ui):
    count = event(ui, "count_tokens")
    assert ">0/75<" in count("")
    assert ">2/75<" in count("a cat")
    assert "/150<" in count(" ".join(["cat"] * 80))
    assert "too long: 10,000/2,000 characters" in count("cat " * 2500)  # Generate would refuse it
    [wiring] = [fn for fn in ui.blocks.fns.values() if fn.api_name == "count_tokens"]
    assert [getattr(block, "label", None) for block in wiring.inputs][1] == "Sampling steps"
    assert ">3/75<" in count("[cat|dog bird fish]", 20)  # the longest text the run reads
    assert ">1/75<" in count("[cat:dog bird fish:30]", 20) and ">3/75<" in count("[cat:dog bird fish:30]", 40)


# --- generation -----------------------------------------------------------------------------
def test_generate_fills_gallery_with_seeds_infotext_and_time(ui, ui_services):
    outputs = generate(ui, prompt="a lighthouse at dusk", seed=1234, n_iter=2)
    first, last = outputs[0], outputs[-1]
    assert "dw-progress" in first[2] and first[3]["visible"] is True  # progress and preview shown at once
    session, gallery, progress, preview, infotext, timing = last
    assert event(ui, "show_selected")(session)["selected_index"] == 0  # the first image shown large, as in A1111
    # A1111's Show grid in gallery (on by default): the run's grid too, after its pictures
    assert [caption for _, caption in gallery] == ["seed 1234", "seed 1235", "grid"]
    assert all(Path(path).is_file() and Path(path).is_relative_to(ui_services.outputs.outdir)
               for path, _ in gallery)
    assert "txt2img-grids" in gallery[2][0] and gallery[2][0] == ui_services.worker.get(session.job_id).grid_path
    assert infotext.startswith("a lighthouse at dusk\n") and "Seed: 1234" in infotext
    assert "Time taken:" in timing and progress == "" and preview["visible"] is False
    assert session.seeds == [1234, 1235, 1234]  # the grid's: the first picture's, as A1111's
    assert ui_services.worker.get(session.job_id).state is JobState.DONE
    session, grid_infotext = event(ui, "select_image")(session, selected(2))
    assert "Seed: 1234" in grid_infotext and event(ui, "reuse_seed")(session) == 1234
    ui_services.options.update({"return_grid": False})
    try:
        gallery = generate(ui, prompt="a lighthouse at dusk", seed=1234, n_iter=2)[-1][1]
    finally:
        ui_services.options.update({"return_grid": True})
    assert [caption for _, caption in gallery] == ["seed 1234", "seed 1235"]


@pytest.mark.parametrize("change", [{"live_previews_enable": False}, {"show_progress_every_n_steps": 0},
                                    {"show_progress_every_n_steps": -1}])
def test_with_previews_off_no_preview_box_is_shown(ui, ui_services, change):
    options = ui_services.options
    before = options.current()
    options.update(change)
    try:
        assert generate(ui, seed=3)[0][3]["visible"] is False
    finally:
        options.update(before.model_dump())
    assert generate(ui, seed=3)[0][3]["visible"] is True


def test_reuse_seed_takes_the_selected_image_and_random_sets_minus_one(ui):
    session = generate(ui, seed=77, n_iter=2)[-1][0]
    assert event(ui, "reuse_seed")(session) == 77
    session, infotext = event(ui, "select_image")(session, selected(1))
    assert "Seed: 78" in infotext
    assert event(ui, "reuse_seed")(session) == 78
    assert event(ui, "random_seed")() == -1
    assert is_skip(event(ui, "reuse_seed")(Session()))  # nothing generated yet: seed box left alone


def test_the_variation_seeds_own_reuse_takes_the_selected_images_and_minus_one_without_a_strength(ui):
    """A1111's ⚄ and ♻ beside the Variation seed (found missing by review): ♻ gives the selected image's variation
    seed where it had a variation strength, else -1."""
    session = Session()
    outputs = list(event(ui, "txt2img")(session, "a lighthouse", "", "Euler a", "Automatic", 2, 7.0, 64, 64, 77, 2,
                                        1, 1, TINY, subseed=500, subseed_strength=0.3))
    session = outputs[-1][0]
    reuse = event(ui, "reuse_subseed")
    assert reuse(session) == 500
    session, _ = event(ui, "select_image")(session, selected(1))
    assert reuse(session) == 501
    plain = generate(ui, seed=77)[-1][0]
    assert reuse(plain) == -1 and is_skip(reuse(Session()))
    [random_subseed] = [fn.fn for fn in ui.blocks.fns.values() if fn.name == "random_seed"
                        and ui.txt2img.widgets["subseed"] in fn.outputs]
    assert random_subseed() == -1


def test_a_seed_past_what_the_page_holds_exactly_is_not_sent_to_it(ui):
    """The browser's numbers hold whole numbers exactly up to 2**53: ♻ or a paste of a larger seed (they go to
    2**64 - 1) put another seed in the box, silently (found by review). They are left out, with a warning."""
    big = 2**60 + 1
    session = Session(seeds=[big], infotexts=[f"a\nSteps: 2, Seed: {big}, Variation seed: {big}, Variation seed "
                                              f"strength: 0.3"], paths=[None])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert is_skip(event(ui, "reuse_seed")(session)) and is_skip(event(ui, "reuse_subseed")(session))
        *values, _ = event(ui, "send_from_pnginfo")(session.infotexts[0])
    by_field = dict(zip(TXT2IMG_FIELDS, values))
    assert is_skip(by_field["seed"]) and is_skip(by_field["subseed"])
    notes = [str(w.message) for w in caught if "holds whole numbers exactly" in str(w.message)]
    assert len(notes) == 4 and notes[0].startswith(f"Seed {big} not applied")
    exact = Session(seeds=[2**53], infotexts=["a\nSteps: 2, Seed: 9007199254740992"], paths=[None])
    assert event(ui, "reuse_seed")(exact) == 2**53


def test_a_gallery_pick_gradio_refuses_leaves_nothing_to_send_but_a_message(ui):
    """Found by a browser probe: picking a thumbnail whose file was deleted fails in Gradio before select_image
    runs; the pick before stayed, and Send sent that picture with its parameters while the page showed another.
    A .failure() step forgets the pick, and sends and ♻ say to pick another until the next pick."""
    fns = list(ui.blocks.fns.values())
    for tab in (ui.txt2img, ui.img2img):
        [select] = [fn for fn in fns if fn.name == "select_image" and tab.session in fn.inputs]
        assert [fn.name for fn in fns if fn.trigger_after == select._id and fn.trigger_only_on_failure] == [
            "pick_failed"]
    session = Session(seeds=[5, 6], infotexts=["a\nSeed: 5", "b\nSeed: 6"], paths=[None, None], selected=0)
    session, shown = event(ui, "pick_failed")(session)
    assert shown == "" and session.current_infotext() == ""
    for name in ("reuse_seed", "gallery_to_img2img"):
        with pytest.raises(gr.Error, match="gone from the outputs folder"):
            event(ui, name)(session)
    session, shown = event(ui, "select_image")(session, selected(1))
    assert shown == "b\nSeed: 6" and event(ui, "reuse_seed")(session) == 6  # the next pick is read again


def test_invalid_request_is_a_readable_message_and_queues_nothing(ui, ui_services):
    before = ui_services.worker.queue_length()
    outputs = generate(ui, width=500)
    assert len(outputs) == 1
    session, _, progress, *_ = outputs[0]
    assert "Width: must be a multiple of 8, got 500" in progress and "dw-error" in progress
    assert session.job_id is None and ui_services.worker.queue_length() == before
    # The page's names for its fields, and what to type instead of a fraction in a whole-number box.
    progress = generate(ui, n_iter=2.5, negative="x" * 2500)[0][2]
    assert "Batch count: Input should be a valid integer, got a number with a fractional part; use 2 or 3" in progress
    assert "Negative prompt: String should have at most 2000 characters; it has 2500" in progress
    assert "n_iter" not in progress and "negative_prompt" not in progress
    # a size's suggestions are sizes: the multiples of 8 either side (73 would be refused next)
    assert "Width: Input should be a valid integer, got a number with a fractional part; use 72 or 80" in generate(
        ui, width=72.5)[0][2]


def test_a_clip_skip_deeper_than_the_model_is_refused_at_generate_saying_how_deep_it_goes(ui, ui_services):
    # The slider ends at 12 whatever is loaded (A1111's); the depth is the job's model's, checked when it is queued.
    assert ui.txt2img.widgets["clip_skip"].maximum == 12 and TINY_TEXT_LAYERS < 12
    before = ui_services.worker.queue_length()
    outputs = generate(ui, clip_skip=TINY_TEXT_LAYERS + 1)
    session, _, progress, *_ = outputs[-1]
    assert f"Clip skip: {TINY}&#x27;s text encoder has {TINY_TEXT_LAYERS} layers; use 1 to {TINY_TEXT_LAYERS}" in progress
    assert "dw-error" in progress and session.job_id is None and ui_services.worker.queue_length() == before
    assert "Generation failed" not in generate(ui, clip_skip=TINY_TEXT_LAYERS)[-1][2]  # its deepest runs


def test_failed_job_is_a_readable_message(ui):
    progress = generate(ui, model="no-such-model")[-1][2]
    assert "Generation failed" in progress and "no-such-model" in progress
    assert "Traceback" not in progress


def test_a_public_server_lets_visitors_pick_only_listed_models(ui, ui_services, monkeypatch):
    monkeypatch.setattr(ui_services.settings, "listen", True)
    for name in ("runwayml/stable-diffusion-v1-5", str(ui_services.settings.models_dir / "tiny-sd" / "..")):
        outputs = generate(ui, model=name)
        assert len(outputs) == 1 and "not found in the models folder" in outputs[0][2], name
    assert generate(ui, model="tiny-sd")[-1][0].job_id is not None
    monkeypatch.setattr(ui_services.settings, "listen", False)
    from webui.ui.models import ModelActions

    assert ModelActions(ui_services).checked_choice("org/some-model") == "org/some-model"  # local use


def drain(async_generator) -> list:
    """Everything an async event handler yields, run to its end."""
    async def collect():
        return [item async for item in async_generator]
    return asyncio.run(collect())


async def step_as_gradio_does(event_fn, *inputs):
    """Run an event handler to its end the way Gradio's queue does: a plain generator's every step on a
    thread of the shared pool, an async one on the event loop."""
    from gradio.utils import SyncToAsyncIterator, async_iteration

    iterator = event_fn(*inputs)
    if not inspect.isasyncgen(iterator):
        iterator = SyncToAsyncIterator(iterator, limiter=None)
    with contextlib.suppress(StopAsyncIteration):
        while True:
            await async_iteration(iterator)


def run_in_thread(ui, session: Session, **kwargs) -> tuple[threading.Thread, list]:
    outputs: list = []

    def target():
        for item in event(ui, "txt2img")(session, kwargs.pop("prompt", "long job"), "", "Euler a", "Automatic",
                                         kwargs["steps"], 7.0, 64, 64, kwargs.get("seed", -1), kwargs["n_iter"], 1, 1,
                                         TINY):
            outputs.append(item)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outputs


def test_selecting_while_a_job_runs_shows_its_image_and_the_selection_outlives_the_run(ui, ui_services):
    # A finished run first: its seeds (500, 501) must not leak into the next run's selection.
    session = generate(ui, seed=500, n_iter=2)[-1][0]
    thread, outputs = run_in_thread(ui, session, steps=40, n_iter=6, seed=900)
    wait_for(lambda: any(isinstance(out[1], list) and len(out[1]) >= 2 for out in outputs), what="two images shown")
    assert ui_services.worker.get(session.job_id).state is JobState.RUNNING

    session, infotext = event(ui, "select_image")(session, selected(1))  # the user clicks the 2nd image
    assert "Seed: 901" in infotext
    assert event(ui, "reuse_seed")(session) == 901
    event(ui, "interrupt")(session)  # ends the run; the images so far stay
    thread.join(60)

    # The browser keeps the clicked image selected when the final gallery arrives: so do Parameters and ♻.
    final_gallery, final_infotext = outputs[-1][1], outputs[-1][4]
    assert final_gallery[1][1] == "seed 901" and event(ui, "show_selected")(session)["selected_index"] == 1
    assert "Seed: 901" in final_infotext and event(ui, "reuse_seed")(session) == 901
    # ...and the run's first update cleared the previous run's selection in the browser.
    assert isinstance(outputs[0][1], gr.Gallery) and outputs[0][1].selected_index is None


def test_two_sessions_see_their_own_jobs_and_interrupt_only_their_own(ui, ui_services):
    worker = ui_services.worker
    first, second = Session(), Session()
    first_thread, first_out = run_in_thread(ui, first, steps=100, n_iter=20)
    wait_for(lambda: first.job_id and worker.get(first.job_id).progress.step > 0, what="first job running")
    second_thread, second_out = run_in_thread(ui, second, steps=100, n_iter=20)
    wait_for(lambda: any("Queued: 1 job ahead" in str(out[2]) for out in second_out), what="queue position")
    # Live previews reach the first session while it denoises.
    wait_for(lambda: any(isinstance(out[3], Image.Image) for out in first_out), what="a live preview")

    event(ui, "interrupt")(second)
    second_thread.join(30)
    assert "Interrupted" in second_out[-1][2]
    assert worker.get(second.job_id).state is JobState.CANCELLED
    assert worker.get(first.job_id).state is JobState.RUNNING  # untouched by the other session
    assert any("Step" in str(out[2]) and "ETA" in str(out[2]) for out in first_out)

    event(ui, "interrupt")(first)
    first_thread.join(30)
    assert worker.get(first.job_id).state is JobState.CANCELLED
    assert "Interrupted" in first_out[-1][2]


def after(ui, name: str):
    """The function of the event chained (.then) right after the event whose function is `name`."""
    first = next(block_fn for block_fn in ui.blocks.fns.values() if block_fn.name == name)
    return next(block_fn.fn for block_fn in ui.blocks.fns.values() if block_fn.trigger_after == first._id)


def test_generate_comes_back_after_a_run_gradio_failed_before_it_began(ui):
    """Gradio's page starts no .then() step after a failed event (an input Gradio refused before generate ran: a
    number past a slider's end, a radio value it does not offer), which left Generate greyed for good (found by
    review): a .failure() step gives it back, then the gallery's pick and the model's status, as after a run."""
    fns = list(ui.blocks.fns.values())
    for name, ungreyed, count in (("generate", "generate_button", 1), ("generate_on_subtab", "generate_button", 6),
                                  ("resume", "resumed_button", 2)):
        # (img2img's hidden button for Gradio API callers runs generate with nothing chained)
        runs = [fn for fn in fns if fn.name == name and any(other.trigger_after == fn._id for other in fns)]
        assert len(runs) == count, name  # txt2img's; img2img's, one per sub-tab; the two tabs' resumes
        for run in runs:
            on_failure = [fn for fn in fns if fn.trigger_after == run._id and fn.trigger_only_on_failure]
            on_end = [fn for fn in fns if fn.trigger_after == run._id and not fn.trigger_only_on_failure]
            assert [fn.name for fn in on_failure] == [ungreyed] and ungreyed in [fn.name for fn in on_end], name
            chain = []
            follower = on_failure[0]
            while follower := next((fn for fn in fns if fn.trigger_after == follower._id), None):
                chain.append(follower.name)
            assert chain == ["show_selected", "status_after_run"]


def test_generate_stays_greyed_out_while_the_tabs_job_runs_even_after_a_resume_that_found_nothing(ui, ui_services):
    # Generate clicked during the page load, before the tab's token arrived: the resume that follows the
    # token finds no job of this tab, and must not make Generate clickable again while the job runs.
    session = Session()
    thread, _ = run_in_thread(ui, session, steps=150, n_iter=1)
    worker = ui_services.worker
    wait_for(lambda: session.job_id and worker.get(session.job_id).progress.step > 0, what="job running")
    assert all(is_skip(value) for value in next(event(ui, "resume")(session, "new-token"))[1:])
    assert is_skip(after(ui, "resume")(session))  # the button is the click's, and its run still greys it out
    assert after(ui, "generate")(session).interactive is False
    worker.cancel(session.job_id)
    thread.join(30)
    assert after(ui, "generate")(session).interactive is True


def test_a_resume_that_found_nothing_leaves_generate_greyed_for_a_click_whose_job_is_not_yet_submitted(ui):
    # Clicked during the page load: the click greyed Generate out, and its run has not yet given the session a
    # job when the resume chain ends; making Generate clickable there left it so for the whole run.
    session = Session()
    assert is_skip(resume_button(ui)(session, "new-token"))
    assert all(is_skip(value) for value in next(event(ui, "resume")(session, "new-token"))[1:])
    assert session.job_id is None
    assert is_skip(after(ui, "resume")(session))


def resume_button(ui):
    """txt2img's page-load step that greys Generate out where the tab has a job to resume."""
    [wiring] = [fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", "") == "resume_button"
                and [block.elem_id for block in fn.outputs] == ["txt2img_generate"]]
    return wiring.fn


def tab_job_running(ui, ui_services, tab: str) -> tuple[Session, threading.Thread]:
    """A long txt2img job of the browser tab `tab`, started from the page and running; its session and thread."""
    session = Session()
    session.tab = tab
    thread, _ = run_in_thread(ui, session, steps=150, n_iter=1)
    worker = ui_services.worker
    wait_for(lambda: session.job_id and worker.get(session.job_id).progress.step > 0, what="job running")
    return session, thread


def test_a_resumed_job_gives_generate_back_when_it_ends(ui, ui_services):
    session, thread = tab_job_running(ui, ui_services, "tab-with-a-job")
    worker = ui_services.worker
    reloaded = Session()
    assert resume_button(ui)(reloaded, "tab-with-a-job").interactive is False
    following = event(ui, "resume")(reloaded, "tab-with-a-job")
    next(following)
    assert after(ui, "resume")(reloaded).interactive is False  # still running
    worker.cancel(session.job_id)
    thread.join(30)
    for _ in following:  # the followed job's end
        pass
    assert after(ui, "resume")(reloaded).interactive is True


def test_a_job_that_ends_between_greying_and_resuming_gives_generate_back(ui, ui_services):
    # The reload came as the run ended: resume_button saw it running and greyed Generate out, resume found it done.
    session, thread = tab_job_running(ui, ui_services, "tab-ending")
    reloaded = Session()
    assert resume_button(ui)(reloaded, "tab-ending").interactive is False
    ui_services.worker.cancel(session.job_id)
    thread.join(30)
    assert all(is_skip(value) for value in next(event(ui, "resume")(reloaded, "tab-ending"))[1:])
    assert after(ui, "resume")(reloaded).interactive is True


def test_a_page_load_greys_generate_out_only_where_the_tab_has_a_job_to_resume(ui, ui_services):
    # Greyed out on every load, a Generate clicked while the page still loads was lost (the click on a greyed button).
    greyed = resume_button(ui)
    assert is_skip(greyed(Session(), "a-fresh-tab")) and is_skip(greyed(Session(), ""))
    session, thread = tab_job_running(ui, ui_services, "tab-with-a-job")
    worker = ui_services.worker
    try:
        assert greyed(Session(), "tab-with-a-job").interactive is False
        assert is_skip(greyed(Session(), "another-tab"))
    finally:
        worker.cancel(session.job_id)
        thread.join(30)


def test_the_model_status_is_said_again_after_a_run_unless_a_load_is_on_its_way(ui, ui_services, monkeypatch):
    # Another tab may have loaded another model since this page last said; this run loaded the tab's own.
    status_after_run = after(ui, "show_selected")
    monkeypatch.setattr(ui_services.worker, "_model_stays", lambda name, wanted: False)  # as if another model were picked
    assert f"Model: {TINY}" in status_after_run()
    session = Session()
    thread, _ = run_in_thread(ui, session, steps=150, n_iter=1)
    worker = ui_services.worker
    wait_for(lambda: session.job_id and worker.get(session.job_id).progress.step > 0, what="job running")
    load = worker.queue_model_load(TINY)  # picked while the job runs: it loads after the job
    assert is_skip(status_after_run())  # the load's own "Loading…" line stays
    worker.cancel(session.job_id)
    thread.join(30)
    load.result(60)
    assert f"Model: {TINY}" in status_after_run()


def test_model_picks_waiting_for_a_long_job_leave_the_shared_threads_free(ui, ui_services, monkeypatch):
    """Each pick in any tab waits behind the running job; waiting on a thread each, 40 of them starved every
    other event and the API's /progress and /interrupt, so nobody could stop the job."""
    import anyio

    worker = ui_services.worker
    session = Session()
    thread, _ = run_in_thread(ui, session, steps=150, n_iter=20)  # runs until cancelled below
    wait_for(lambda: session.job_id and worker.get(session.job_id).progress.step > 0, what="job running")
    asked, queue_model_load = [], worker.queue_model_load
    monkeypatch.setattr(worker, "queue_model_load", lambda name: asked.append(name) or queue_model_load(name))
    monkeypatch.setattr(worker, "_model_stays", lambda name, wanted: False)  # as if each named another model

    async def picks_then_a_thread():
        picks = [asyncio.create_task(step_as_gradio_does(event(ui, "load_model"), TINY)) for _ in range(45)]
        while len(asked) < 40:  # as many as the shared pool has threads
            await asyncio.sleep(0.05)
        try:  # what /progress needs: one thread of the shared pool
            return await asyncio.wait_for(anyio.to_thread.run_sync(lambda: "a thread was free"), 5)
        finally:
            worker.cancel(session.job_id)
            await asyncio.gather(*picks)

    try:
        assert asyncio.run(picks_then_a_thread()) == "a thread was free"
    finally:
        worker.cancel(session.job_id)
        thread.join(30)


def test_the_model_status_says_when_an_api_client_has_unloaded_the_model(ui, ui_services):
    status_after_run = after(ui, "show_selected")
    try:
        ui_services.worker.release_device().result(60)
        assert "unloaded by an API client; the next image loads it again" in status_after_run()
    finally:
        ui_services.worker.restore_device().result(60)
    assert "unloaded" not in status_after_run()


def test_a_reloaded_page_resumes_only_its_own_tabs_job(ui, ui_services):
    first_page = Session(tab="tab-one")
    thread, _ = run_in_thread(ui, first_page, steps=150, n_iter=1)
    worker = ui_services.worker
    wait_for(lambda: first_page.job_id and worker.get(first_page.job_id).progress.step > 0, what="job running")
    stranger = next(event(ui, "resume")(Session(), "tab-two"))
    assert stranger[0].job_id is None and all(is_skip(value) for value in stranger[1:])
    reloaded = Session()  # the same tab after a reload: a new session, the same token
    follow = event(ui, "resume")(reloaded, "tab-one")
    assert "Step" in next(follow)[2] and reloaded.job_id == first_page.job_id
    event(ui, "interrupt")(reloaded)
    assert "Interrupted" in list(follow)[-1][2]
    thread.join(30)
    assert worker.get(first_page.job_id).state is JobState.CANCELLED


def test_a_run_whose_every_batch_was_skipped_shows_the_unfinished_image_unsaved(ui, ui_services):
    session = Session()
    thread, outputs = run_in_thread(ui, session, steps=40, n_iter=1)
    worker = ui_services.worker
    wait_for(lambda: session.job_id and worker.get(session.job_id).progress.step > 0, what="job running")
    event(ui, "skip")(session)
    thread.join(60)
    assert worker.get(session.job_id).state is JobState.DONE
    assert [caption for _, caption in outputs[-1][1]] == [f"seed {session.seeds[0]} (unfinished)"]
    assert "Skipped; 1 unfinished shown, not saved." in outputs[-1][2]


def test_the_interrupt_message_counts_what_was_saved_apart_from_what_was_cut_short():
    from webui.schemas import GeneratedImage, GenerationRequest
    from webui.ui.progress import final_html
    from webui.worker import Job

    job = Job(id="j", request=GenerationRequest(), origin="ui", state=JobState.CANCELLED)
    job.images = [GeneratedImage(image=None, seed=1, index=0, infotext="", unfinished=True),
                  GeneratedImage(image=None, seed=2, index=1, infotext="", unfinished=True)]
    assert "Interrupted; 0 images saved; 2 unfinished shown, not saved." in final_html(job)
    job.images.insert(0, GeneratedImage(image=None, seed=0, index=0, infotext="", path="00001-0.png"))
    assert "Interrupted; 1 image saved; 2 unfinished shown, not saved." in final_html(job)


def test_the_grid_after_a_skipped_first_picture_is_labelled_by_its_own_first_picture(tmp_path):
    """A Skip cut the first picture short: the grid holds the later two, and the file says the first of those; the
    gallery labelled it with the skipped picture's seed and infotext (♻ gave a seed in neither). Found by a probe."""
    from webui.schemas import GeneratedImage, GenerationRequest
    from webui.ui.session import show_images
    from webui.worker import Job

    job = Job(id="j", request=GenerationRequest(), origin="ui", state=JobState.DONE)
    job.images = [GeneratedImage(image=None, seed=3000, index=0, infotext="skipped", unfinished=True),
                  GeneratedImage(image=None, seed=3001, index=0, infotext="Seed: 3001", path="00056-3001.png"),
                  GeneratedImage(image=None, seed=3002, index=0, infotext="Seed: 3002", path="00057-3002.png")]
    job.grid, job.grid_path = Image.new("RGB", (128, 64)), str(tmp_path / "grid-0011.png")
    session = Session()
    items = show_images(session, job, grid=True)
    assert items[-1][1] == "grid" and (session.seeds[-1], session.infotexts[-1]) == (3001, "Seed: 3001")


def test_skip_while_the_job_is_queued_says_it_has_nothing_to_end_yet(ui, ui_services, monkeypatch):
    """It did nothing, silently, and the job later ran whole. Found by a probe."""
    said = []
    monkeypatch.setattr(gr, "Info", lambda message, *args, **kwargs: said.append(message))
    worker = ui_services.worker
    blocker = worker.submit({"prompt": "x", "steps": 150, "width": 64, "height": 64, "model": TINY}, origin="ui")
    try:
        wait_for(lambda: blocker.state is JobState.RUNNING, what="the blocker to run")
        session = Session()
        thread, outputs = run_in_thread(ui, session, steps=2, n_iter=1)
        wait_for(lambda: session.job_id and worker.get(session.job_id).state is JobState.QUEUED, what="queued")
        event(ui, "skip")(session)
        assert said and "still queued" in said[0] and not worker.get(session.job_id).skip_event.is_set()
    finally:
        worker.cancel(blocker.id)
    thread.join(60)
    assert worker.get(session.job_id).state is JobState.DONE


def test_skip_ends_the_current_image_and_goes_on(ui, ui_services):
    session = Session()
    thread, outputs = run_in_thread(ui, session, steps=40, n_iter=2)
    worker = ui_services.worker
    wait_for(lambda: session.job_id and worker.get(session.job_id).progress.step > 0, what="job running")
    event(ui, "skip")(session)  # one of the two batches is skipped, whichever is running
    thread.join(60)
    job = worker.get(session.job_id)
    assert job.state is JobState.DONE and [im.unfinished for im in job.images] in ([True, False], [False, True])
    assert len(outputs[-1][1]) == 2


# --- models ---------------------------------------------------------------------------------
def test_model_refresh_and_load(models_dir, tmp_path):
    own_models = tmp_path / "models"
    own_models.mkdir()
    (own_models / "tiny-a").symlink_to(models_dir / TINY, target_is_directory=True)
    services = build_services(Settings(models_dir=own_models, outdir=tmp_path / "out", ckpt="tiny-a", device="cpu"))
    try:
        ui = create_ui(services)
        assert ui.picker.dropdown.value == "tiny-a" and "tiny-a" in ui.models.status()
        (own_models / "tiny-b").symlink_to(models_dir / TINY, target_is_directory=True)
        update, vae_update = event(ui, "refresh_models")("tiny-a", "gone.safetensors")
        assert update["choices"] == ["tiny-a", "tiny-b"] and update["value"] == "tiny-a"
        assert vae_update["choices"] == ["Automatic", "None"] and vae_update["value"] == "Automatic"  # gone: back

        status, picker, width, height, *img2img_sliders = drain(event(ui, "load_model")("tiny-b"))[-1]
        assert "tiny-b" in status and (picker["value"], width, height) == ("tiny-b", 64, 64)
        assert img2img_sliders == [width, height]  # the img2img tab's size follows the model too
        status, picker, *_ = drain(event(ui, "load_model")("missing-model"))[-1]
        assert "Could not load missing-model" in status and picker["value"] == "tiny-b"  # the dropdown goes back

        # A page opened (or reloaded) now shows tiny-b, not tiny-a of the page built at start.
        picker, status, width, height = ui.models.on_page_load()
        assert picker["value"] == "tiny-b" and "Model: tiny-b" in status and (width, height) == (64, 64)
    finally:
        services.close()


def test_a_model_loaded_from_outside_the_models_folder_can_be_used_on_a_shared_server(models_dir, tmp_path):
    """Gradio refuses a dropdown value missing from its list; with --share or --listen nothing else may be
    typed, so the loaded --ckpt path must be on the list."""
    import shutil

    outside = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(models_dir / TINY, outside)
    own_models = tmp_path / "models"
    own_models.mkdir()
    (own_models / "tiny-a").symlink_to(models_dir / TINY, target_is_directory=True)
    services = build_services(Settings(models_dir=own_models, outdir=tmp_path / "out", ckpt=str(outside),
                                       device="cpu", listen=True))
    try:
        ui = create_ui(services)
        loaded = services.engine.model.entry.name
        assert ui.picker.dropdown.value == loaded and loaded in [c[0] for c in ui.picker.dropdown.choices]
        values = ui.picker.dropdown.preprocess(loaded)  # what Gradio does with the value a Generate sends
        assert values == loaded
        # ...and the job that names it runs on it (the registry cannot find it by name outside the folder)
        job = services.worker.submit({"prompt": "x", "steps": 1, "model": loaded})
        assert job.wait(60) and job.state is JobState.DONE, job.error
    finally:
        services.close()


def test_sending_a_model_another_tab_found_updates_the_list_too(ui, ui_services, models_dir):
    import shutil

    shutil.copytree(models_dir / TINY, ui_services.settings.models_dir / "tiny-new")
    try:
        ui_services.registry.refresh()  # as another tab's refresh button or /refresh-checkpoints does
        text = "a castle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny-new"
        *values, _ = event(ui, "send_from_pnginfo")(text)
        model = values[TXT2IMG_FIELDS.index("model")]
        assert model["value"] == "tiny-new" and "tiny-new" in model["choices"]
    finally:
        shutil.rmtree(ui_services.settings.models_dir / "tiny-new")
        ui_services.registry.refresh()


def test_an_a1111_infotext_finds_a_model_in_a_subfolder_by_base_name_or_by_hash(ui, ui_services, models_dir):
    import shutil

    sub = ui_services.settings.models_dir / "SD15" / "tiny-sub"
    shutil.copytree(models_dir / TINY, sub)
    try:
        with next((sub / "unet").glob("*.safetensors")).open("ab") as weights:
            weights.write(b"\0")  # other weights than the loaded copy's: a hash of its own (it is never loaded)
        ui_services.registry.refresh()
        entry = ui_services.registry.find("SD15/tiny-sub")
        digest = ui_services.registry.short_hash(entry)  # hashed once, as loading it would
        # A1111 writes a model in a subfolder by its base name alone.
        text = "a castle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny-sub"
        assert event(ui, "send_from_pnginfo")(text)[TXT2IMG_FIELDS.index("model")]["value"] == "SD15/tiny-sub"
        # A name that matches nothing here (renamed since), with the hash of a model that is here.
        text = text.replace("Model: tiny-sub", f"Model hash: {digest}, Model: renamed-since")
        assert event(ui, "send_from_pnginfo")(text)[TXT2IMG_FIELDS.index("model")]["value"] == "SD15/tiny-sub"
    finally:
        shutil.rmtree(sub.parent)
        ui_services.registry.refresh()


def test_send_from_history_sets_the_batch_size_of_a_batch_image(ui, ui_services):
    session = generate(ui, prompt="a pair of owls", seed=300, batch_size=2)[-1][0]
    second = next(im for im in ui_services.worker.get(session.job_id).images if im.seed == 301)
    values = event(ui, "send_from_history")(second.history_id)
    assert values[TXT2IMG_FIELDS.index("batch_size")] == 2 and values[TXT2IMG_FIELDS.index("seed")] == 301


def test_send_from_history_fills_the_tab_as_png_infos_send_does(ui, ui_services):
    """The same picture sent from History and from PNG Info fills every field alike; History's own list of fields
    left SGM noise multiplier out, so a picture made with it was made again without. Found by review."""
    session = Session()
    list(event(ui, "txt2img")(session, "a fox", steps=2, width=64, height=64, seed=77, model=TINY,
                              sampler_name="Euler", sgm_noise_multiplier=True))
    image = ui_services.worker.get(session.job_id).images[0]
    from_history = event(ui, "send_from_history")(image.history_id)
    from_png_info = event(ui, "send_from_pnginfo")(image.infotext)
    assert from_history[TXT2IMG_FIELDS.index("sgm_noise_multiplier")] is True
    differing = [name for name, ours, theirs in zip(TXT2IMG_FIELDS, from_history, from_png_info) if ours != theirs]
    assert differing == []


def test_send_to_txt2img_sets_the_batch_size_of_a_batch_image(ui):
    text = "a castle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 9, Size: 64x64, Batch size: 4, Batch pos: 2"
    values = event(ui, "send_from_pnginfo")(text)
    assert values[TXT2IMG_FIELDS.index("batch_size")] == 4 and values[TXT2IMG_FIELDS.index("seed")] == 9
    single = event(ui, "send_from_pnginfo")(text.replace(", Batch size: 4, Batch pos: 2", ""))
    assert single[TXT2IMG_FIELDS.index("batch_size")] == 1  # left out when written: 1


def test_the_paste_button_reads_the_parameters_pasted_into_the_prompt_or_the_last_pictures(ui, ui_services):
    from webui.ui.params import IMG2IMG_FIELDS

    paste = event(ui, "paste_into_txt2img")
    text = ("a lighthouse at dusk\nNegative prompt: fog\nSteps: 3, Sampler: Euler, CFG scale: 5.5, Seed: 123, "
            "Size: 64x72, Denoising strength: 0.4, Hires upscale: 2, Hires upscaler: Latent")
    *values, tab = paste(text, Session())
    fields = dict(zip(TXT2IMG_FIELDS, values))
    assert (fields["prompt"], fields["negative_prompt"], fields["steps"], fields["seed"]) == (
        "a lighthouse at dusk", "fog", 3, 123)
    assert (fields["cfg_scale"], fields["width"], fields["height"], fields["enable_hr"]) == (5.5, 64, 72, True)
    # With the box empty: the last picture the tab shows.
    session = generate(ui, prompt="a lonely owl", seed=4242, steps=2)[-1][0]
    fields = dict(zip(TXT2IMG_FIELDS, paste("", session)[:-1]))
    assert fields["prompt"] == "a lonely owl" and fields["seed"] == 4242
    with pytest.raises(gr.Error, match="Nothing to read"):
        paste("  ", Session())
    with pytest.raises(gr.Error, match="holds no parameters"):
        paste("just a prompt, with words", Session())
    fields = dict(zip(IMG2IMG_FIELDS, event(ui, "paste_into_img2img")(text, Session())[:-1]))
    assert fields["denoising_strength"] == 0.4 and fields["steps"] == 3


def test_variation_seeds_go_from_the_page_to_the_infotext_and_back(ui, ui_services):
    session = Session()
    outputs = list(event(ui, "txt2img")(session, "a variation probe", "", "Euler a", "Automatic", 2, 7.0, 64, 64,
                                        11, 1, 1, 1, TINY, 77, 0.3))
    text = outputs[-1][4]
    assert "Seed: 11, " in text and "Variation seed: 77, Variation seed strength: 0.3" in text
    for values in (event(ui, "send_from_pnginfo")(text),
                   event(ui, "send_from_history")(ui_services.worker.get(session.job_id).images[0].history_id)):
        assert (values[TXT2IMG_FIELDS.index("subseed")], values[TXT2IMG_FIELDS.index("subseed_strength")]) == (77, 0.3)
    plain = event(ui, "send_from_pnginfo")("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64")
    assert plain[TXT2IMG_FIELDS.index("subseed_strength")] == 0  # no variation written: none applied
    labels = input_labels(ui, "txt2img")
    assert (labels["subseed"], labels["subseed_strength"], labels["styles"]) == (
        "Variation seed (-1 = random)", "Variation strength", "Styles")
    assert (labels["seed_resize_from_w"], labels["seed_resize_from_h"]) == ("Resize seed from width",
                                                                           "Resize seed from height")
    resized = event(ui, "send_from_pnginfo")("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 96x64, "
                                             "Seed resize from: 64x48")
    assert [resized[TXT2IMG_FIELDS.index(name)] for name in ("seed_resize_from_w", "seed_resize_from_h")] == [64, 48]
    assert [plain[TXT2IMG_FIELDS.index(name)] for name in ("seed_resize_from_w", "seed_resize_from_h")] == [0, 0]
    *_, last = event(ui, "txt2img")(Session(), "a resized seed", steps=2, width=96, height=64, seed=1,
                                    seed_resize_from_w=64, seed_resize_from_h=48)
    assert ", Seed resize from: 64x48, " in last[4]


def input_labels(ui, api_name: str) -> dict:
    """A Generate event's inputs by generate()'s parameter names: each widget's label (None for a gr.State)."""
    from webui.ui.generation import REQUEST_PARAMS

    [wiring] = [fn for fn in ui.blocks.fns.values() if fn.api_name == api_name]
    return {name: getattr(block, "label", None) for name, block in zip(REQUEST_PARAMS, wiring.inputs[1:], strict=True)}


def test_the_random_number_source_goes_from_the_page_to_the_infotext_and_back(ui, ui_services):
    """The run's own choice, or the Settings tab's; a pasted A1111 infotext without RNG was made by its GPU source."""
    assert input_labels(ui, "txt2img")["randn_source"] == "Random number generator source"
    *_, settings = event(ui, "txt2img")(Session(), "an rng probe", steps=2, width=64, height=64, seed=4)
    *_, nv = event(ui, "txt2img")(Session(), "an rng probe", steps=2, width=64, height=64, seed=4, randn_source="NV")
    assert ", RNG: CPU, " in settings[4] and ", RNG: NV, " in nv[4]  # the Settings tab's: CPU
    field = TXT2IMG_FIELDS.index("randn_source")
    assert event(ui, "send_from_pnginfo")(nv[4])[field] == "NV"
    assert event(ui, "send_from_pnginfo")("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64")[field] == "NV"
    assert event(ui, "send_from_pnginfo")(settings[4])[field] == "CPU"


def test_the_hires_fix_goes_from_the_page_to_the_infotext_and_back(ui):
    *_, last = event(ui, "txt2img")(Session(), "a hires probe", steps=2, width=64, height=64, seed=3, model=TINY,
                                    enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1, denoising_strength=0.6)
    session, text = last[0], last[4]
    assert "Size: 64x64, Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 1, Hires upscaler: Latent" in text
    assert Image.open(session.paths[0]).size == (96, 96)
    sent = event(ui, "send_from_pnginfo")(text)
    assert [sent[TXT2IMG_FIELDS.index(name)] for name in ("enable_hr", "hr_scale", "hr_second_pass_steps",
                                                          "denoising_strength")] == [True, 1.5, 1, 0.6]
    plain = event(ui, "send_from_pnginfo")("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64")
    assert plain[TXT2IMG_FIELDS.index("enable_hr")] is False  # a picture made without it turns it off
    # and sets its own settings back, as A1111's paste: nothing of an earlier picture's second pass lingers
    assert [plain[TXT2IMG_FIELDS.index(name)] for name in ("hr_sampler_name", "hr_scheduler", "hr_prompt",
                                                           "hr_negative_prompt")] == [
        "Use same sampler", "Use same scheduler", "", ""]
    # The second pass's own sampler: to the page's lists, "Use same ..." when the hires fix sent has none.
    index = TXT2IMG_FIELDS.index
    own = event(ui, "send_from_pnginfo")(text.replace("Hires upscaler: Latent", "Hires upscaler: Latent, "
                                                      "Hires sampler: DPM++ 2M Karras"))
    assert (own[index("hr_sampler_name")], own[index("hr_scheduler")]) == ("DPM++ 2M", "Karras")
    assert (sent[index("hr_sampler_name")], sent[index("hr_scheduler")]) == ("Use same sampler", "Use same scheduler")
    *_, last = event(ui, "txt2img")(Session(), "a hires probe", steps=2, width=64, height=64, seed=3, model=TINY,
                                    enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1, denoising_strength=0.6,
                                    hr_sampler_name="DDIM", hr_scheduler="Use same scheduler")
    assert "Hires upscaler: Latent, Hires sampler: DDIM" in last[4]
    # A hires sampler that cannot follow the hires schedule type picked runs its Automatic, as the API's, and says so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *_, last = event(ui, "txt2img")(Session(), "a hires probe", steps=2, width=64, height=64, seed=3, model=TINY,
                                        enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1, denoising_strength=0.6,
                                        sampler_name="Euler", hr_sampler_name="DDIM", hr_scheduler="Karras")
    assert "Hires sampler: DDIM" in last[4] and "dw-error" not in last[2]
    assert any("Hires schedule type Karras: DDIM cannot follow it" in str(w.message) for w in caught)
    labels = input_labels(ui, "txt2img")
    assert (labels["hr_sampler_name"], labels["hr_scheduler"]) == ("Hires sampling method", "Hires schedule type")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other = event(ui, "send_from_pnginfo")(text.replace("Hires upscaler: Latent", "Hires upscaler: 4x-UltraSharp"))
    assert is_skip(other[TXT2IMG_FIELDS.index("hr_upscaler")])
    assert any("Upscaler not applied: '4x-UltraSharp'" in str(w.message) for w in caught)
    # A model upscaler the server lists (Real-ESRGAN's, downloaded when first used) is applied
    real = event(ui, "send_from_pnginfo")(text.replace("Hires upscaler: Latent", "Hires upscaler: R-ESRGAN 4x+"))
    assert real[TXT2IMG_FIELDS.index("hr_upscaler")]["value"] == "R-ESRGAN 4x+"  # with the list as it is now
    # img2img's Generate has no hires widgets: it passes generate()'s defaults in their places.
    assert input_labels(ui, "txt2img")["hr_scale"] == "Upscale by" and input_labels(ui, "img2img")["hr_scale"] is None


def test_the_hires_prompts_go_from_the_page_to_the_infotext_and_back(ui):
    *_, last = event(ui, "txt2img")(Session(), "a hires probe", "dull", steps=2, width=64, height=64, seed=3,
                                    model=TINY, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1,
                                    hr_prompt="a sharper probe", hr_negative_prompt="")
    assert "Hires upscaler: Latent, Hires prompt: a sharper probe, Model hash" in last[4]  # "": the negative prompt
    index = TXT2IMG_FIELDS.index
    sent = event(ui, "send_from_pnginfo")(last[4])
    assert (sent[index("hr_prompt")], sent[index("hr_negative_prompt")]) == ("a sharper probe", "")
    labels = input_labels(ui, "txt2img")
    assert (labels["hr_prompt"], labels["hr_negative_prompt"]) == ("Hires prompt", "Hires negative prompt")
    *_, refused = event(ui, "txt2img")(Session(), "a hires probe", steps=2, width=64, height=64, model=TINY,
                                       enable_hr=True, hr_prompt="x" * 2001)
    assert "Hires prompt: String should have at most 2000 characters" in refused[2]


def test_a_model_that_cannot_be_applied_is_named_in_a_warning(ui):
    text = "a castle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: not-here"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *values, _ = event(ui, "send_from_pnginfo")(text)
    assert is_skip(values[TXT2IMG_FIELDS.index("model")])
    assert any("Model not applied: 'not-here' is not in the models folder" in str(w.message) for w in caught)


# --- history --------------------------------------------------------------------------------
def test_history_pages_search_select_send_and_delete(ui, ui_services, monkeypatch):
    monkeypatch.setattr(history_module, "PAGE_SIZE", 2)
    actions = ui.history_actions
    generate(ui, prompt="a zebra", seed=10, n_iter=3)
    generate(ui, prompt="a quokka", seed=20)

    page, ids, gallery, info, newer, older = actions.load_page(0, "zebra")
    assert len(ids) == 2 and "Page 1 of 2 · 3 images" in info
    assert not newer["interactive"] and older["interactive"]  # nothing newer than the first page
    assert [caption for _, caption in gallery["value"]] == ["a zebra (seed 12)", "a zebra (seed 11)"]  # newest first
    page, ids, gallery, _, newer, older = actions.next_page(page, "zebra")
    assert page == 1 and [caption for _, caption in gallery["value"]] == ["a zebra (seed 10)"]
    assert newer["interactive"] and not older["interactive"]  # nothing older than the last
    assert actions.next_page(page, "zebra")[0] == 1  # clamped at the last page

    image_id, path, details, open_file, delete, confirm_row = actions.select(ids, selected(0))
    assert Path(path) == ui_services.outputs.resolve(ui_services.history.get_image(image_id).path)
    assert "Seed: 10" in details and open_file["link"].startswith("gradio_api/file=")
    assert delete["interactive"] and not confirm_row["visible"]  # Delete asks again before it deletes

    *values, tabs = event(ui, "send_from_history")(image_id)
    by_field = dict(zip(["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width",
                         "height", "seed", "clip_skip", "model"], values))
    assert (by_field["prompt"], by_field["seed"], by_field["steps"]) == ("a zebra", 10, 2)
    assert by_field["model"]["value"] == TINY and TINY in by_field["model"]["choices"]
    assert tabs.selected == "txt2img"

    *page_outputs, gone_id, gone_image, gone_details, _, delete, confirm_row = actions.delete(image_id, 1, "zebra")
    assert not Path(path).exists() and ui_services.history.get_image(image_id) is None
    assert page_outputs[0] == 0 and "2 images" in page_outputs[3]  # back to the only page left
    assert (gone_id, gone_image, gone_details) == (None, None, "")
    assert not delete["interactive"] and not confirm_row["visible"]
    with pytest.raises(gr.Error):
        actions.delete(None, 0, "")


def test_history_counts_right_at_once_after_files_are_deleted_by_hand(ui, ui_services):
    generate(ui, prompt="a wombat probe", seed=30, n_iter=3)
    rows, _ = ui_services.history.list_images(0, 3, "wombat probe")
    for row in rows[1:]:  # the two older ones, which the page's first row does not show
        ui_services.outputs.resolve(row.path).unlink()
    page, ids, items, info, *_ = ui.history_actions.load_page(0, "wombat probe")
    assert len(ids) == 1 and "Page 1 of 1 · 1 image matching" in info, info


def test_history_timer_reloads_only_when_images_finish(ui, monkeypatch):
    actions = ui.history_actions
    seen = actions.reload(0, "")[6]
    with monkeypatch.context() as patch:  # nothing changed: the timer reads no page (a count reads every row)
        patch.setattr(actions.history, "list_images", lambda *args: pytest.fail("the timer read a page"))
        assert all(is_skip(value) for value in actions.poll(0, "", seen))
    generate(ui, prompt="a heron", seed=5)
    page, ids, gallery, info, _, _, now, *details = actions.poll(0, "", seen)
    assert now != seen and gallery["value"][0][1] == "a heron (seed 5)"
    assert all(is_skip(value) for value in details)  # nothing selected: the detail view is left alone


def test_after_a_reload_the_highlight_stays_on_the_selected_image_or_goes(ui, ui_services):
    actions = ui.history_actions
    generate(ui, prompt="a highlight probe", seed=40, n_iter=2)
    _, ids, gallery, *_ = actions.load_page(0, "highlight probe")
    chosen = ids[1]  # the older of the two
    generate(ui, prompt="a highlight probe", seed=50)  # another tab's image comes first now
    _, ids, gallery, _, _, _, _, *details = actions.reload(0, "highlight probe", chosen)
    assert ids.index(chosen) == 2 and gallery["selected_index"] == 2  # it moved, and the highlight with it
    assert all(is_skip(value) for value in details)
    _, _, gallery, *_ = actions.load_page(0, "no such prompt at all", chosen)
    assert gallery["selected_index"] is None  # not on the page: nothing highlighted


def test_an_image_deleted_in_another_tab_leaves_the_detail_view(ui, ui_services):
    actions = ui.history_actions
    generate(ui, prompt="a deleted elsewhere probe", seed=60)
    _, ids, *_ = actions.load_page(0, "deleted elsewhere probe")
    ui_services.history.delete_image(ids[0])  # another tab's Delete for good
    details = list(actions.reload(0, "", ids[0])[7:])  # after the page's six outputs and the fingerprint
    assert details[:3] == [None, None, ""] and not details[4]["interactive"]  # emptied, Delete greyed out
    for action in (lambda: actions.fields(ids[0]), lambda: actions.delete(ids[0], 0, "")):
        with pytest.raises(gr.Error, match="no longer in the history"):
            action()


# --- PNG Info -------------------------------------------------------------------------------
def save_png(path: Path, text: str | None) -> str:
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=info)
    return str(path)


def test_png_info_reads_our_png(ui):
    path = generate(ui, prompt="an owl", seed=99)[-1][1][0][0]
    infotext, table = event(ui, "png_info")(path)
    assert infotext.startswith("an owl\n") and "<th>Seed</th><td>99</td>" in table


def test_png_info_reads_stable_diffusion_webui_png_and_sends_it(ui, tmp_path):
    infotext, table = event(ui, "png_info")(save_png(tmp_path / "a1111.png", A1111_INFOTEXT))
    assert infotext == A1111_INFOTEXT
    assert "<th>Lora hashes</th><td>detail: 1a2b3c, style: 4d5e6f</td>" in table
    *values, tabs = event(ui, "send_from_pnginfo")(infotext)
    by_field = dict(zip(["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width",
                         "height", "seed", "clip_skip", "model"], values))
    assert by_field["prompt"] == "masterpiece, a castle on a hill" and by_field["negative_prompt"] == "blurry, lowres"
    assert (by_field["sampler_name"], by_field["scheduler"]["value"]) == ("DPM++ 2M", "Karras")  # old name split
    assert by_field["scheduler"]["choices"] == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential",
                                                "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal",
                                                "DDIM", "Beta"]
    assert (by_field["steps"], by_field["cfg_scale"], by_field["seed"]) == (25, 6.5, 42)
    assert (by_field["width"], by_field["height"]) == (512, 768)
    assert is_skip(by_field["model"])  # not in our models folder: the dropdown is left alone, with a warning
    assert tabs.selected == "txt2img"


def test_send_to_txt2img_leaves_out_values_past_the_sliders_and_says_so(ui):
    text = "a castle\nSteps: 200, Sampler: Euler, CFG scale: 35, Seed: 42, Size: 4096x512, Clip skip: 2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *values, _ = event(ui, "send_from_pnginfo")(text)
    by_field = dict(zip(["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width",
                         "height", "seed", "clip_skip", "model"], values))
    for name in ("steps", "cfg_scale", "width"):  # the slider keeps its value: Generate still works
        assert is_skip(by_field[name]), name
    assert (by_field["height"], by_field["seed"], by_field["clip_skip"]) == (512, 42, 2)
    notes = [str(w.message) for w in caught if "not applied" in str(w.message)]
    assert any(n.startswith("Sampling steps 200 not applied: this page takes 1 to 150") for n in notes)
    assert any(n.startswith("CFG scale 35.0 not applied") for n in notes)
    assert any(n.startswith("Width 4096 not applied") for n in notes) and len(notes) == 3


def test_send_to_txt2img_leaves_out_a_clip_skip_and_sampler_options_past_their_sliders(ui):
    text = "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x64, Clip skip: 13, Eta: 1.5, " \
           "Sigma noise: 2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *values, _ = event(ui, "send_from_pnginfo")(text)
    by_field = dict(zip(TXT2IMG_FIELDS, values))
    for name in ("clip_skip", "eta_ancestral", "s_noise"):  # values Gradio would refuse at every Generate
        assert is_skip(by_field[name]), name
    notes = [str(w.message) for w in caught if "not applied" in str(w.message)]
    assert any(n.startswith("Clip skip 13 not applied: this page takes 1 to 12") for n in notes)
    assert any(n.startswith("Eta for ancestral samplers 1.5 not applied") for n in notes)
    assert any(n.startswith("Sigma noise 2.0 not applied") for n in notes) and len(notes) == 3


def test_a_send_leaves_out_every_value_past_its_widgets_ends_not_only_a_listed_few(ui):
    """Found by review: NGMS 20 (its slider ends at 15) was set, and Gradio refused every Generate after; an A1111
    UniPC variant this page lacks (vary_coeff) likewise. Each bounded widget's ends are its own (field_limits)."""
    text = ("a castle\nSteps: 20, Sampler: UniPC, CFG scale: 7, Seed: 42, Size: 64x64, NGMS: 20, "
            "Skip Early CFG: 2, Extra noise: 3, UniPC variant: vary_coeff")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *values, _ = event(ui, "send_from_pnginfo")(text)
    by_field = dict(zip(TXT2IMG_FIELDS, values))
    for name in ("s_min_uncond", "skip_early_cond", "img2img_extra_noise"):
        assert is_skip(by_field[name]), name
    assert by_field["uni_pc_variant"] in ("bh1", "bh2") or is_skip(by_field["uni_pc_variant"])
    notes = [str(w.message) for w in caught if "not applied" in str(w.message)]
    assert any(n.startswith("Negative Guidance minimum sigma 20.0 not applied: this page takes 0 to 15") for n in notes)
    assert len(notes) == 3, notes
    for tab in (ui.txt2img, ui.img2img):
        limits = tab.field_limits
        assert {"steps", "s_min_uncond", "subseed_strength", "uni_pc_order"} <= limits.keys()
        assert set(limits) <= FIELD_LABELS.keys(), set(limits) - FIELD_LABELS.keys()  # each note names its widget


def test_send_to_txt2img_rounds_a_size_that_is_no_multiple_of_8_down_and_says_so(ui):
    text = "a castle\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 516x767"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *values, _ = event(ui, "send_from_pnginfo")(text)
    by_field = dict(zip(TXT2IMG_FIELDS, values))
    assert (by_field["width"], by_field["height"]) == (512, 760)  # Generate takes these
    notes = [str(w.message) for w in caught]
    assert "Width 516 set to 512: sizes here are multiples of 8." in notes
    assert "Height 767 set to 760: sizes here are multiples of 8." in notes


def sent_sampler(ui, sampler_params: str) -> tuple[Any, Any, list[str]]:
    """(sampler, schedule type) that PNG Info's "Send to txt2img" gives the dropdowns, and its warnings."""
    text = f"a castle\nSteps: 20, {sampler_params}, CFG scale: 7, Seed: 1, Size: 64x64"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = event(ui, "send_from_pnginfo")(text)  # gr.Warning outside a request is a Python warning
    notes = [str(warning.message) for warning in caught if "not applied" in str(warning.message)]
    sampler, schedule = values[2], values[3]
    if isinstance(schedule, dict) and "value" in schedule:  # with the list of the new sampler's schedules
        assert schedule["value"] in schedule["choices"]
        assert schedule["choices"] == list(get_sampler(sampler).schedules)
        schedule = schedule["value"]
    return sampler, schedule, notes


def test_the_schedule_type_list_follows_the_sampler(ui):
    schedules_for = event(ui, "schedules_for")
    assert schedules_for("DDIM", "Karras") == gr.update(choices=["Automatic", "SGM Uniform"], value="Automatic")
    assert "value" not in schedules_for("Euler a", "Karras")  # Euler a follows every schedule type, as in A1111
    assert "value" not in schedules_for("DPM++ 2M", "SGM Uniform")  # kept: DPM++ 2M can follow it
    assert schedules_for("LCM", "Karras")["choices"] == ["Automatic"]
    # A sampler pick can reach the server with the old schedule type while the list Gradio knows is already
    # the new sampler's: Gradio's own check of the value then failed with a raw pop-up, before schedules_for.
    scheduler = ui.txt2img.widgets["scheduler"]
    built = scheduler.choices
    scheduler.choices = [(label, label) for label in schedules_of("DDIM")]  # as Gradio holds it after the pick
    try:
        assert scheduler.preprocess("Exponential") == "Exponential"
    finally:
        scheduler.choices = built
    assert schedules_for("DDIM", "Exponential")["value"] == "Automatic"  # which then resets it


def test_send_to_txt2img_keeps_a_known_sampler_and_says_what_it_could_not_apply(ui):
    assert sent_sampler(ui, "Sampler: DPM++ 2M, Schedule type: Karras") == ("DPM++ 2M", "Karras", [])
    # Valid in stable-diffusion-webui, refused here: the sampler stays, the schedule falls back to Automatic.
    sampler, schedule, notes = sent_sampler(ui, "Sampler: PLMS, Schedule type: Karras")
    assert (sampler, schedule) == ("PLMS", "Automatic")
    assert len(notes) == 1 and "Karras" in notes[0] and "PLMS" in notes[0] and "Using Automatic" in notes[0]
    assert sent_sampler(ui, "Sampler: Euler a, Schedule type: Karras") == ("Euler a", "Karras", [])
    assert sent_sampler(ui, "Sampler: DPM++ 2M, Schedule type: KL Optimal") == ("DPM++ 2M", "KL Optimal", [])
    for unknown in ("Linear Quadratic", "Karras Exponential"):  # ComfyUI's, a stable-diffusion-webui fork's
        sampler, schedule, notes = sent_sampler(ui, f"Sampler: DPM++ 2M, Schedule type: {unknown}")
        assert (sampler, schedule) == ("DPM++ 2M", "Karras")  # what Automatic stands for with DPM++ 2M
        assert len(notes) == 1 and f"unknown schedule type '{unknown}'" in notes[0] and "Using Karras" in notes[0]
    # An unknown sampler leaves both dropdowns as they were, and says so.
    sampler, schedule, notes = sent_sampler(ui, "Sampler: DPM adaptive, Schedule type: Karras")
    assert is_skip(sampler) and is_skip(schedule)
    assert len(notes) == 1 and "unknown sampler 'DPM adaptive'" in notes[0] and "left as they were" in notes[0]


def test_png_info_without_parameters_or_not_an_image(ui, tmp_path):
    read = event(ui, "png_info")
    infotext, message = read(save_png(tmp_path / "plain.png", None))
    assert infotext == "" and "no generation parameters" in message
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert "Could not read" in read(str(tmp_path / "junk.png"))[1]
    with pytest.raises(gr.Error):
        event(ui, "send_from_pnginfo")("")


def uploaded(path: Path) -> dict:
    """What the browser sends for a file dropped on an upload widget."""
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def through_gradio(ui, name: str, *inputs) -> list:
    """Run an event the way a browser request does: Gradio's preprocessing first, then the function."""
    block_fn = next(fn for fn in ui.blocks.fns.values() if fn.api_name == name)
    result = asyncio.run(ui.blocks.process_api(block_fn=block_fn, inputs=list(inputs), state=SessionState(ui.blocks),
                                               explicit_call=True))
    return result["data"]


def test_a_broken_controlnet_picture_fails_no_generate_with_controlnet_off_and_is_named_with_it_on(ui, tmp_path):
    """Found by review: the ControlNet picture, an input of every Generate, was a plain gr.Image: junk left in it
    failed each Generate in Gradio's preparation of the inputs, with a raw pop-up, ControlNet on or off."""
    from webui.ui.pictures import UnreadablePicture

    (tmp_path / "junk.png").write_bytes(b"not a png")
    widget = ui.txt2img.widgets["controlnet_image"]
    junk = widget.preprocess(widget.data_model(**uploaded(tmp_path / "junk.png")))
    assert isinstance(junk, UnreadablePicture)
    txt2img = event(ui, "txt2img")
    arguments = ("a lighthouse", "", "Euler a", "Automatic", 2, 7.0, 64, 64, 1, 1, 1, 1, TINY)
    *_, (_, gallery, progress, *_) = txt2img(Session(), *arguments, controlnet_image=junk)
    assert "dw-error" not in progress and len(gallery) == 1, progress
    *_, (_, _, progress, *_) = txt2img(Session(), *arguments, controlnet_image=junk, controlnet_enabled=True)
    assert "ControlNet picture: could not read junk.png as an image" in progress and "dw-error" in progress, progress
    with pytest.raises(gr.Error, match="ControlNet picture: could not read junk.png"):  # Preview names it so too
        event(ui, "preview")(junk, "canny", 512, 100, 200)


def test_a_send_without_parameters_keeps_the_styles_picked(ui):
    """A plain picture sent to img2img (from Extras, or PNG Info with no text) sends no prompt: the Styles picked
    stay (they were cleared; found by review). A sent prompt has its styles joined in, so they are cleared then."""
    from webui.ui.params import TAB_FIELDS, widget_updates

    names = TAB_FIELDS["img2img"]
    assert is_skip(dict(zip(names, widget_updates({}, names, [TINY], lambda *_: None)))["styles"])
    assert dict(zip(names, widget_updates({"prompt": "a"}, names, [TINY], lambda *_: None)))["styles"] == []


def test_png_info_upload_of_a_broken_file_says_so_and_clears_the_old_parameters(ui, tmp_path):
    good = Path(save_png(tmp_path / "a1111.png", A1111_INFOTEXT))
    assert through_gradio(ui, "png_info", uploaded(good))[0] == A1111_INFOTEXT
    (tmp_path / "junk.png").write_bytes(b"not a png")
    noise = Image.frombytes("RGB", (32, 32), os.urandom(32 * 32 * 3))
    noise.save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])  # opens, but its image data ends early
    for name in ("junk.png", "cut.png"):
        infotext, message = through_gradio(ui, "png_info", uploaded(tmp_path / name))
        assert infotext == ""  # the last image's parameters are gone: Send to txt2img cannot apply them
        assert f"Could not read {name} as an image" in message and "dw-error" in message
        assert str(tmp_path) not in message and "/tmp/" not in message  # no server paths shown


def test_png_info_reads_the_parameters_of_a_png_cut_short_after_them_and_says_it_is_damaged(ui, tmp_path):
    noise = Image.frombytes("RGB", (32, 32), os.urandom(32 * 32 * 3))
    info = PngInfo()
    info.add_text("parameters", A1111_INFOTEXT)
    noise.save(tmp_path / "whole.png", pnginfo=info)  # the text chunk comes before the pixels
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])  # a download that broke off
    infotext, message = through_gradio(ui, "png_info", uploaded(tmp_path / "cut.png"))
    assert infotext == A1111_INFOTEXT  # so Send to txt2img still works
    assert "cut.png is damaged" in message and "<th>Seed</th><td>42</td>" in message


def test_the_seed_box_shows_the_seed_used_and_survives_a_seed_past_64_bits(ui):
    import orjson  # what Gradio's server sends the page with

    block_fn = next(fn for fn in ui.blocks.fns.values() if fn.name == "shown_seed")

    def left_box(value):
        result = asyncio.run(ui.blocks.process_api(block_fn=block_fn, inputs=[value], state=SessionState(ui.blocks),
                                                   explicit_call=True))
        orjson.dumps(result["data"])  # raised "Integer exceeds 64-bit range" for 1e30: an error in the log
        return result["data"][0]

    assert left_box(12.7) == 13
    assert is_skip(left_box(1e30))  # left as typed; Generate says which seeds there are


# --- launching ------------------------------------------------------------------------------
def with_settings(services, **changes):
    return dataclasses.replace(services, settings=dataclasses.replace(services.settings, port=free_port(), **changes))


def test_serve_prints_the_address_and_serves_the_page(ui_services):
    from webui.launch import describe, serve

    services = with_settings(ui_services)
    served = serve(services)
    try:
        assert describe(served, services) == [f"Running on local URL: http://127.0.0.1:{services.settings.port}"]
        page = httpx.get(served.url + "/")
        assert page.status_code == 200 and "diffusers-webui" in page.text
        assert httpx.get(served.url + "/config").json()["components"]  # the Blocks config is served
        # A long-running server keeps neither every closed tab's session nor every preview file Gradio wrote.
        assert served.blocks.state_holder.capacity == 1000 and served.blocks.delete_cache == (3600, 3600)
    finally:
        served.close()


def test_gradio_auth_puts_a_login_page_in_front(ui_services):
    from webui.launch import serve

    served = serve(with_settings(ui_services, gradio_auth=[("ana", "s3cret")]))
    try:
        with httpx.Client(base_url=served.url) as client:
            assert client.get("/config").status_code == 401
            assert client.post("/login", data={"username": "ana", "password": "wrong"}).status_code == 400
            assert client.post("/login", data={"username": "ana", "password": "s3cret"}).status_code == 200
            assert client.get("/config").status_code == 200
    finally:
        served.close()


def test_api_is_attached_to_the_served_app_when_asked(ui_services, monkeypatch):
    import webui.api
    from webui.launch import serve

    def attach_api(app, services):
        app.add_api_route("/sdapi/v1/ping", lambda: {"model": services.engine.model.entry.name})

    monkeypatch.setattr(webui.api, "attach_api", attach_api, raising=False)
    served = serve(with_settings(ui_services, api=True))
    try:
        assert httpx.get(served.url + "/sdapi/v1/ping").json() == {"model": TINY}
    finally:
        served.close()


def test_the_real_api_joins_the_ui_with_its_docs(ui_services):
    from webui.launch import describe, serve

    services = with_settings(ui_services, api=True)
    served = serve(services)
    try:
        samplers = httpx.get(served.url + "/sdapi/v1/samplers").json()
        assert "Euler a" in [sampler["name"] for sampler in samplers]
        assert httpx.get(served.url + "/docs").status_code == 200
        assert httpx.get(served.url + "/").status_code == 200  # the UI is still there
        assert f"REST API: {served.url}/sdapi/v1/ (docs at {served.url}/docs)" in describe(served, services)
    finally:
        served.close()


def test_a_ui_login_guards_the_api_too_and_an_open_public_api_is_warned_about(ui_services):
    from webui.launch import Served, describe, serve

    services = with_settings(ui_services, api=True, gradio_auth=[("me", "secret")])
    served = serve(services)
    try:
        assert httpx.get(served.url + "/sdapi/v1/samplers").status_code == 401
        assert httpx.get(served.url + "/sdapi/v1/samplers", auth=("me", "secret")).status_code == 200
        assert "REST API login: the --gradio-auth users" in "\n".join(describe(served, services))
    finally:
        served.close()

    class FakeBlocks:
        server_port = 7860

    open_api = with_settings(ui_services, api=True, listen=True)
    lines = describe(Served(FakeBlocks(), None, "http://127.0.0.1:7860", None), open_api)
    assert any(line.startswith("WARNING: the REST API has no login") for line in lines)


def test_the_api_is_attached_before_the_page_is_served(ui_services, monkeypatch):
    """A client that waits for the page and then calls /sdapi must never get a 404."""
    import webui.api
    from webui.launch import serve

    real_attach = webui.api.attach_api
    page_answered = []

    def attach(app, services):
        try:
            page_answered.append(httpx.get(f"http://127.0.0.1:{services.settings.port}/", timeout=0.5).status_code)
        except httpx.HTTPError:
            page_answered.append(None)
        real_attach(app, services)

    monkeypatch.setattr(webui.api, "attach_api", attach)
    served = serve(with_settings(ui_services, api=True))
    try:
        assert page_answered == [None]
        assert httpx.get(served.url + "/sdapi/v1/samplers").status_code == 200
    finally:
        served.close()


def test_a_broken_api_install_fails_with_its_own_error_before_anything_is_served(ui_services, monkeypatch):
    import webui.api
    from webui.launch import serve

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda *args, **kwargs: launched.append(1))
    monkeypatch.delattr(webui.api, "attach_api", raising=False)
    with pytest.raises(ImportError, match=r"attach_api"):  # the import's own message, with its traceback
        serve(with_settings(ui_services, api=True))
    assert launched == []


def test_nowebui_runs_the_api_app_alone_and_ctrl_c_cancels_the_jobs_first(ui_services, monkeypatch):
    """uvicorn lets a running request finish before it stops; a blocking /txt2img waits for its job, so
    Ctrl+C must cancel the jobs as it starts the server's shutdown."""
    import signal

    import uvicorn
    import webui.api
    from webui.launch import launch

    calls, stopped = [], threading.Event()

    def run_until_ctrl_c(server):
        calls.append((server.config.app, server.config.host, server.config.port))
        server.handle_exit(signal.SIGINT, None)

    monkeypatch.setattr(webui.api, "create_api_app", lambda services: "api-app", raising=False)
    monkeypatch.setattr(uvicorn.Server, "run", run_until_ctrl_c)
    services = with_settings(ui_services, nowebui=True)
    monkeypatch.setattr(type(services), "close", lambda self: None)  # the module's services stay up
    monkeypatch.setattr(services.worker, "stop", lambda *args, **kwargs: stopped.set())
    launch(services)
    assert calls == [("api-app", "127.0.0.1", services.settings.port)]
    assert stopped.wait(5), "Ctrl+C did not stop the worker's jobs"


@pytest.mark.parametrize("mode, serving", [("--nowebui", "Running the REST API only"), ("--api", "REST API:")])
def test_ctrl_c_answers_a_waiting_txt2img_then_stops_without_a_traceback(tmp_path, mode, serving):
    """A real SIGINT to `python app.py` while a blocking /sdapi/v1/txt2img waits on its job: the job is
    cancelled and the request answered before the server closes (not a dropped connection), then the
    process ends cleanly. Gradio's own Ctrl+C handling closed the server first and the answer was lost."""
    import signal
    import subprocess
    import sys

    from tests.browser_server import ROOT

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "app.py", mode, "--port", str(port), "--outdir", str(tmp_path / "out")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores SIGINT
    lines, answers = [], []
    api = f"http://127.0.0.1:{port}/sdapi/v1"
    try:
        for line in process.stdout:
            lines.append(line)
            if serving in line:
                break
        long_job = {"prompt": "a fox", "steps": 150, "width": 256, "height": 256}
        waiting = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{api}/txt2img", json=long_job, timeout=120)), daemon=True)
        waiting.start()
        wait_for(lambda: httpx.get(f"{api}/progress", timeout=5).json()["state"]["sampling_step"] > 0,
                 what="the job to be sampling")
        process.send_signal(signal.SIGINT)
        waiting.join(60)
        lines.extend(process.stdout)
        assert process.wait(60) == 0
    finally:
        process.kill()
    output = "".join(lines)
    assert answers, f"the waiting request got no answer:\n{output[-3000:]}"
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["info"], answers[0].text
    assert "Traceback" not in output, output


def test_ctrl_c_while_the_model_loads_stops_with_a_word_and_lets_go_of_the_outputs(tmp_path, monkeypatch, capsys):
    import app
    from webui.storage.outputs import OutputStore
    from webui.worker import Worker
    from tests.browser_server import free_port

    def interrupted(self, name, timeout=None, remember=True):
        raise KeyboardInterrupt  # Ctrl+C during a long first download

    def exit_now(code):  # os._exit: a plain exit would wait for a download's threads to finish every file
        raise SystemExit(f"os._exit({code})")

    monkeypatch.setattr(Worker, "load_model", interrupted)
    monkeypatch.setattr(app.os, "_exit", exit_now)
    with pytest.raises(SystemExit) as stopped:
        app.main(["--outdir", str(tmp_path / "out"), "--device", "cpu", "--port", str(free_port())])
    assert stopped.value.code == "os._exit(130)" and "Stopped while starting." in capsys.readouterr().err
    assert OutputStore(tmp_path / "out").claim()  # no running server holds the folder any more


def test_a_port_in_use_is_reported_before_any_model_loads(ui_services):
    import socket

    from webui.launch import check_port_free

    settings = with_settings(ui_services).settings
    check_port_free(settings)
    with socket.socket() as taken:
        taken.bind((settings.host, settings.port))
        taken.listen()  # a server is running there
        with pytest.raises(SystemExit, match=f"Cannot serve on 127.0.0.1:{settings.port}.*--port N"):
            check_port_free(settings)
    # a name that resolves to nothing is said to be one, not a taken port
    unknown = dataclasses.replace(settings, server_name="no.such.host.invalid")
    with pytest.raises(SystemExit, match="'no.such.host.invalid' is no address of this machine") as stopped:
        check_port_free(unknown)
    assert "another server" not in str(stopped.value)


def test_what_would_leave_the_server_unable_to_serve_or_to_draw_stops_it_before_the_model_loads(ui_services):
    """An IPv6 --server-name crashed inside Gradio's launch after the model had loaded; a --device the machine lacks
    started a server whose every job failed with 'no model is loaded; pick one in the model list'. Found by a
    probe."""
    import torch

    from webui.launch import check_before_loading

    settings = with_settings(ui_services).settings
    check_before_loading(settings)
    with pytest.raises(SystemExit, match="Cannot serve the web UI on the IPv6 address ::1.*--nowebui"):
        check_before_loading(dataclasses.replace(settings, server_name="::1"))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="Cannot start: --device cuda was given but no CUDA GPU is visible"):
            check_before_loading(dataclasses.replace(settings, device="cuda"))


def test_share_without_network_is_a_message_not_a_crash(ui_services, monkeypatch, capsys):
    import gradio.networking
    from webui.launch import describe, serve

    def no_network(*args, **kwargs):
        raise RuntimeError("Could not get share link from Gradio API Server.")

    monkeypatch.setattr(gradio.networking, "setup_tunnel", no_network)
    services = with_settings(ui_services, share=True)
    served = serve(services)
    try:
        assert served.share_url is None
        lines = describe(served, services)
        assert any("could not get a public link" in line and served.url in line for line in lines)
        assert httpx.get(served.url + "/").status_code == 200
    finally:
        served.close()


def test_busy_port_is_a_clear_error(ui_services):
    from webui.launch import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        services = dataclasses.replace(ui_services, settings=dataclasses.replace(
            ui_services.settings, port=sock.getsockname()[1]))
        with pytest.raises(SystemExit, match="--port"):
            serve(services)


def test_listen_describes_all_interfaces(ui_services):
    from webui.launch import Served, describe

    class FakeBlocks:
        server_port = 7860

    services = dataclasses.replace(ui_services, settings=dataclasses.replace(ui_services.settings, listen=True))
    assert services.settings.host == "0.0.0.0"
    line = describe(Served(FakeBlocks(), None, "http://127.0.0.1:7860", None), services)[0]
    assert "http://0.0.0.0:7860" in line and "all network interfaces" in line


def test_history_never_shows_files_outside_outdir(ui, ui_services, tmp_path):
    # A history row pointing outside outdir (a tampered database) gets no image and no link.
    row_id = ui_services.history.add_image(
        job_id=ui_services.worker.submit({"prompt": "x", "steps": 1, "save_images": False}).id,
        path=os.path.relpath(save_png(tmp_path / "outside.png", "x"), ui_services.outputs.outdir),
        prompt="x", negative_prompt="", seed=1, steps=1, sampler="Euler a", scheduler="Automatic", cfg_scale=7.0,
        width=8, height=8, clip_skip=1, model_name=TINY, model_hash=None, image_index=0, nsfw=False, seconds=None,
        infotext="x")
    image_id, path, details, open_file, delete, _ = ui.history_actions.show(row_id)
    assert (image_id, path, details) == (None, None, "") and open_file["interactive"] is delete["interactive"] is False


def test_a_shared_server_without_login_offers_no_delete(ui_services, monkeypatch):
    from webui.ui.history import HistoryActions

    assert HistoryActions(ui_services).can_delete  # local use
    monkeypatch.setattr(ui_services.settings, "share", True)
    actions = HistoryActions(ui_services)
    assert not actions.can_delete
    with pytest.raises(gr.Error, match="Deleting is off"):
        actions.delete(1, 0, "")
    monkeypatch.setattr(ui_services.settings, "gradio_auth", [("a", "b")])
    assert HistoryActions(ui_services).can_delete


def test_the_lora_picker_puts_its_tag_in_the_prompt_and_generate_uses_it(ui, ui_services, tmp_path):
    from tests.test_lora import kohya_state, lora_pairs, write_lora
    from webui.engine.lora import LoraLibrary

    library, ui_services.engine.loras = ui_services.engine.loras, LoraLibrary(tmp_path)
    try:
        refresh, add = event(ui, "refresh_loras"), event(ui, "add_lora")
        [wiring] = [fn for fn in ui.blocks.fns.values() if fn.api_name == "add_lora"]
        assert [block.label for block in wiring.inputs] == ["Prompt", "LoRA", "Weight"]
        assert [block.label for block in wiring.outputs] == ["Prompt"]
        assert refresh()["choices"] == []
        write_lora(tmp_path, "detail", kohya_state(lora_pairs()))
        assert event(ui, "file_lists")()[1]["choices"] == ["detail"]  # a page loaded later lists it without ↻
        assert refresh()["choices"] == ["detail"]
        assert add("a cat", "detail", 0.8) == "a cat <lora:detail:0.8>"
        assert add("a cat <lora:detail:0.8>, red", "detail", 0.5) == "a cat <lora:detail:0.5>, red"  # no second tag
        assert add(None, "detail", 1.0) == "<lora:detail:1>"
        with pytest.raises(gr.Error, match="Pick a LoRA first"):
            add("a cat", None, 1.0)
        *_, last = generate(ui, prompt="a lighthouse <lora:detail:0.5>", seed=4)
        assert "Lora hashes: \"detail: " in last[4], last[2]
        *_, refused = generate(ui, prompt="a lighthouse <lora:detial>")
        assert "no LoRA named &#x27;detial&#x27;" in refused[2] or "no LoRA named 'detial'" in refused[2], refused[2]
    finally:
        ui_services.engine.loras = library


def test_the_embedding_picker_names_it_in_either_prompt(ui, ui_services, tmp_path, monkeypatch):
    from tests.test_embeddings import vectors, write_a1111_pt

    monkeypatch.setattr(ui_services.engine.settings, "embeddings_dir", tmp_path)
    write_a1111_pt(tmp_path, "badhands", vectors(2, 1))
    assert "badhands" in event(ui, "refresh_embeddings")()["choices"]
    add = event(ui, "add_embedding")
    assert add("a cat", "badhands") == "a cat, badhands"
    assert add("blurry,", "badhands") == "blurry, badhands"
    assert add("(BadHands:1.2), blurry", "badhands") == "(BadHands:1.2), blurry"  # there already
    with pytest.raises(gr.Error, match="Pick an embedding first"):
        add("a cat", None)
    [negative] = [fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", "") == "add_embedding"
                  and fn.api_name != "add_embedding" and fn.inputs[0].elem_id == "txt2img_neg_prompt"]
    assert [block.label for block in negative.inputs] == ["Negative prompt", "Embedding"]
    *_, last = generate(ui, negative="badhands", seed=3)
    assert "TI hashes: \"badhands: " in last[4], last[2]


def test_styles_are_applied_saved_and_deleted_from_the_page(ui, ui_services):
    from webui.storage.styles import Style

    path = ui_services.settings.styles_path
    try:
        save, delete, apply = event(ui, "save_style"), event(ui, "delete_style"), event(ui, "apply_styles")
        assert save("Film", "film still of {prompt}", "cartoon")["choices"] == ["Film"]
        assert ui_services.styles.styles() == [Style("Film", "film still of {prompt}", "cartoon")]
        prompt, negative, picked = apply("a cat", "ugly", ["Film"])
        assert (prompt, negative, picked["value"]) == ("film still of a cat", "ugly, cartoon", [])
        with pytest.raises(gr.Error, match="Pick one or more styles first"):
            apply("a cat", "", [])
        session = Session()
        *_, last = list(event(ui, "txt2img")(session, "a lighthouse", "", "Euler a", "Automatic", 2, 7.0, 64, 64,
                                             3, 1, 1, 1, TINY, -1, 0.0, ["Film"]))
        assert last[4].startswith("film still of a lighthouse\nNegative prompt: cartoon\n"), last[2]
        *_, refused = list(event(ui, "txt2img")(Session(), "a lighthouse", "", "Euler a", "Automatic", 2, 7.0, 64, 64,
                                                3, 1, 1, 1, TINY, -1, 0.0, ["Gone"]))
        assert "no style named" in refused[2]
        # A page built before the save (another tab, a reload) gets the list when it loads.
        assert event(ui, "file_lists")()[0]["choices"] == ["Film"]
        sent = event(ui, "send_from_pnginfo")(last[4])  # the prompt has the style joined in: the pick is cleared
        assert sent[TXT2IMG_FIELDS.index("styles")] == [] and sent[0] == "film still of a lighthouse"
        # The other tab's list follows a save or a delete on this one: one styles file, two lists.
        follows = [fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", "") == "offered_styles"]
        assert {tuple(block.elem_id for block in fn.outputs) for fn in follows} == {("txt2img_styles",),
                                                                                   ("img2img_styles",)}
        img2img_list = next(fn.fn for fn in follows if fn.outputs[0].elem_id == "img2img_styles")
        assert img2img_list(["Film", "Gone"]) == {"__type__": "update", "choices": ["Film"], "value": ["Film"]}
        assert delete("Film", ["Film"]) == {"__type__": "update", "choices": [], "value": []}
        assert img2img_list(["Film"]) == {"__type__": "update", "choices": [], "value": []}  # picked there: dropped
        # As the list opens it is read again; a pick whose style is gone stays offered (Gradio would refuse it at
        # Generate with a raw message; the worker says "no style named" instead), and no pick is changed.
        listed = event(ui, "styles_list")
        save("Oil", "{prompt}, in oil", "")
        assert listed(["Gone"]) == {"__type__": "update", "choices": ["Oil", "Gone"]}
        with pytest.raises(gr.Error, match="No style is named 'Film'"):
            delete("Film", [])
    finally:
        path.unlink(missing_ok=True)


def test_a_shared_server_without_a_login_offers_no_style_editing(tmp_path):
    from webui.ui.generation import GenerationActions

    services = build_services(Settings(outdir=tmp_path / "out", device="cpu", share=True), load_model=False)
    try:
        actions = GenerationActions(services, models=None)
        assert not actions.can_edit_shared
        with pytest.raises(gr.Error, match="Saving styles is off on a server shared without --gradio-auth"):
            actions.save_style("Film", "a", "b")
        assert not services.settings.styles_path.exists()
    finally:
        services.close()


def test_the_notification_sound_is_a1111s_file_beside_app_py_where_there_is_one(tmp_path):
    from webui.config import PROJECT_ROOT
    from webui.ui.blocks import notification_sound

    assert parse_settings([]).notification_audio == PROJECT_ROOT / "notification.mp3"
    assert parse_settings(["--notification-audio", str(tmp_path / "bell.mp3")]).notification_audio == \
        tmp_path / "bell.mp3"
    with gr.Blocks():
        assert notification_sound(tmp_path / "bell.mp3") is None and notification_sound(None) is None  # no file: none
        (tmp_path / "bell.mp3").write_bytes(b"ID3")
        sound = notification_sound(tmp_path / "bell.mp3")
    assert (sound.elem_id, sound.visible) == ("audio_notification", "hidden")


def test_a_start_model_that_is_nowhere_falls_back_to_the_first_of_the_models_folder(models_dir, tmp_path, caplog):
    """As A1111 ("Checkpoint ... not found; loading fallback ..."): the server starts ready to generate."""
    own_models = tmp_path / "models"
    own_models.mkdir()
    (own_models / "tiny-b").symlink_to(models_dir / TINY, target_is_directory=True)
    (own_models / "tiny-a").symlink_to(models_dir / TINY, target_is_directory=True)
    (own_models / "a-empty.ckpt").write_bytes(b"")  # listed first, and no model: the next one is tried (a probe)
    with caplog.at_level("WARNING", logger="webui.services"):
        services = build_services(Settings(models_dir=own_models, outdir=tmp_path / "out", device="cpu",
                                           ckpt=str(tmp_path / "typo.safetensors")))
    try:
        assert services.engine.model.entry.name == "tiny-a"
        said = " ".join(record.getMessage() for record in caplog.records)
        assert "typo.safetensors" in said and "does not exist" in said and "loading a-empty instead" in said
        assert "loading tiny-a instead" in said
    finally:
        services.close()


def test_a_start_model_that_will_not_load_is_not_replaced(models_dir, tmp_path):
    """Only a name that is nowhere falls back: a model that is there but broken is the user's to fix."""
    own_models = tmp_path / "models"
    (own_models / "broken").mkdir(parents=True)
    (own_models / "broken" / "model_index.json").write_text("{not json")
    (own_models / "tiny-a").symlink_to(models_dir / TINY, target_is_directory=True)
    services = build_services(Settings(models_dir=own_models, outdir=tmp_path / "out", device="cpu", ckpt="broken"))
    try:
        assert services.engine.model is None
    finally:
        services.close()


def test_a_second_stop_signal_while_stopping_exits_at_once_without_a_traceback(monkeypatch, capsys):
    """systemd and Docker send SIGTERM again (and users press Ctrl+C twice): the second one used to raise
    KeyboardInterrupt inside the server's shutdown, a traceback."""
    import signal

    from webui import launch as launch_module

    exits = []
    def exit_now(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(launch_module.os, "_exit", exit_now)
    handler = launch_module.stop_then_exit_at_once()
    try:  # (pytest.raises lets a KeyboardInterrupt through: it ends the session)
        handler(signal.SIGTERM, None)
        first = None
    except KeyboardInterrupt as raised:
        first = raised
    assert isinstance(first, KeyboardInterrupt) and exits == []  # the first stops cleanly, as Ctrl+C
    with pytest.raises(SystemExit):
        handler(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT] and "Stopped at once" in capsys.readouterr().err


def test_a_queued_job_with_none_ahead_is_said_to_be_next():
    """Between a plot's pictures the next one waits with nothing ahead: "0 jobs ahead of yours" read oddly."""
    from webui.schemas import parse_request
    from webui.ui.progress import progress_html
    from webui.worker import Job

    job = Job(id="queued", request=parse_request({"prompt": "x"}), origin="ui")
    assert "Queued: yours is next" in progress_html(job, 0)
    assert "Queued: 2 jobs ahead of yours" in progress_html(job, 2)


def test_a_stale_history_page_lands_on_the_last_page_there_is_when_its_files_are_gone(tmp_path, monkeypatch):
    """A page past the end goes to the last page; where reading that page finds its files deleted by hand, the pages
    shrink again: it said 'Page 3 of 2' with nothing shown. Found by review."""
    from types import SimpleNamespace

    from tests.test_storage import history_row
    from webui.storage.history import History
    from webui.storage.outputs import OutputStore
    from webui.ui.history import HistoryActions

    monkeypatch.setattr(history_module, "PAGE_SIZE", 2)
    history = History(tmp_path / "history.sqlite3", tmp_path)
    actions = HistoryActions(SimpleNamespace(history=history, outputs=OutputStore(tmp_path),
                                             settings=SimpleNamespace(open_to_anyone=False)))
    try:
        history.add_job("j1", "ui", {}, 1.0)
        for number in range(6):
            (tmp_path / f"{number}.png").write_bytes(b"png")
            history.add_image(**history_row("j1", f"{number}.png", seed=number), created_at=float(number))
        for number in (0, 1):  # the last page's pictures, deleted in a file manager
            (tmp_path / f"{number}.png").unlink()
        page, ids, gallery, info, newer, older = actions.load_page(5, "")
        assert (page, len(ids)) == (1, 2) and "Page 2 of 2 · 4 images" in info, info
    finally:
        history.close()


def test_a_picture_that_cannot_be_deleted_says_so_and_stays(tmp_path, monkeypatch):
    """A file system's error came through raw (its errno and the server's path); now a sentence, and the picture
    and its row stay. Found by review."""
    from types import SimpleNamespace

    from tests.test_storage import history_row
    from webui.storage.history import History
    from webui.storage.outputs import OutputStore
    from webui.ui.history import HistoryActions

    history = History(tmp_path / "history.sqlite3", tmp_path)
    actions = HistoryActions(SimpleNamespace(history=history, outputs=OutputStore(tmp_path),
                                             settings=SimpleNamespace(open_to_anyone=False)))
    try:
        history.add_job("j1", "ui", {}, 1.0)
        (tmp_path / "a.png").write_bytes(b"png")
        image_id = history.add_image(**history_row("j1", "a.png"))

        def refused(self, missing_ok=False):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "unlink", refused)
        with pytest.raises(gr.Error, match=r"could not be deleted \(Permission denied\); it is still there"):
            actions.delete(image_id, 0, "")
        monkeypatch.undo()
        assert (tmp_path / "a.png").exists() and history.get_image(image_id).file_state == "ok"
    finally:
        history.close()
