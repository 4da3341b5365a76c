"""The Train tab for textual inversion (A1111's): Create embedding, Train, their API routes, progress and Interrupt.

Runs on the tiny model (tests/tiny_sd.py) with 64x64 pictures and a few steps; no previews but in one test.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import random

import gradio as gr
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.helpers import (
    finished_job, interrupted_api_training, noise_picture, running_services, wait_for,
)
from webui.api import create_api_app
from webui.engine.embeddings import read_embedding
from webui.engine.training import RateSchedule, prompt_text
from webui.schemas import InvalidRequest, JobState
from webui.textual_inversion import NewEmbedding, TrainEmbedding, plan_training, queue_new_embedding
from webui.training import TrainingRun, filewords_of
from webui.ui.progress import format_seconds
from webui.ui.train import TrainSession, build_train_tab

TINY_WIDTH = 32  # the tiny text encoder's width
A1111_KEYS = {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    yield from running_services(models_dir, root / "outputs", embeddings_dir=root / "embeddings")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three 64x64 pictures: one with a caption file, two named as A1111's preprocessing names them."""
    folder = tmp_path_factory.mktemp("dataset")
    for number in range(3):
        noise_picture(number).save(folder / f"{number:05d}-a red apple {number}.png")
    (folder / "00000-a red apple 0.txt").write_text("shiny, round\n")
    (folder / "notes.md").write_text("not a picture")
    return folder


def create(services, name: str, **fields):
    new = NewEmbedding(name=name, **fields)
    return queue_new_embedding(services.worker, new, services.settings.embeddings_folder).result(60)


def train_fields(dataset, name: str, **fields) -> TrainEmbedding:
    defaults = dict(embedding_name=name, data_root=str(dataset), training_width=64, training_height=64, steps=3,
                    create_image_every=0, save_embedding_every=0, template_filename="subject_filewords.txt")
    return TrainEmbedding(**(defaults | fields))


def train(services, dataset, name: str, **fields) -> TrainingRun:
    run = TrainingRun(plan_training(train_fields(dataset, name, **fields), services.settings))
    services.worker.train(run).result(120)
    return run


def token_table(services) -> torch.Tensor:
    return services.engine.pipe.text_encoder.get_input_embeddings().weight


# --- Create embedding -----------------------------------------------------------------------------
def test_a_created_embedding_is_a1111s_pt_and_both_loaders_read_it(services):
    path = create(services, "apple", init_text="red apple", num_vectors_per_token=3)
    assert path == services.settings.embeddings_folder / "apple.pt"
    data = torch.load(path, map_location="cpu", weights_only=True)  # no code runs: A1111's plain layout
    assert set(data) == A1111_KEYS
    assert data["name"] == "apple" and data["step"] == 0 and data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"] and data["string_to_param"]["*"].shape == (3, TINY_WIDTH)
    assert torch.equal(read_embedding(path).vectors, data["string_to_param"]["*"])
    # Read in at once: prompts use it without a refresh.
    loaded = services.engine.embeddings.loaded["apple"]
    assert loaded.step == 0
    assert torch.equal(token_table(services)[list(loaded.vector_ids)], data["string_to_param"]["*"])
    assert not list(path.parent.glob(".partial-*"))  # written by way of a temporary file, which is gone


def test_the_initialization_text_gives_its_tokens_vectors_repeated_or_cut(services):
    tokenizer, table = services.engine.tokenizer, token_table(services)
    red, apple = tokenizer("red apple", add_special_tokens=False).input_ids
    stretched = torch.load(create(services, "stretched", init_text="red apple", num_vectors_per_token=4),
                           weights_only=True)["string_to_param"]["*"]
    assert torch.equal(stretched, table[[red, red, apple, apple]].detach())  # A1111's i * tokens // vectors
    cut = torch.load(create(services, "cut", init_text="red apple", num_vectors_per_token=1),
                     weights_only=True)["string_to_param"]["*"]
    assert torch.equal(cut, table[[red]].detach())
    blank = torch.load(create(services, "blank", init_text="", num_vectors_per_token=2),
                       weights_only=True)["string_to_param"]["*"]
    assert torch.equal(blank, torch.zeros(2, TINY_WIDTH))


def test_bad_names_and_taken_names_are_refused_and_overwrite_replaces(services):
    folder = services.settings.embeddings_folder
    create(services, "taken", init_text="cat")
    for name, says in (("../escape", "no /"), ("sub/name", "no /"), ("..", "no /"), (".hidden", ". at the start"),
                       ("", "give the embedding a name"), ("star*", "'*'"), ("taken", "taken.pt exists")):
        with pytest.raises(InvalidRequest, match=f"name: .*{says.replace('*', '[*]')}"):
            create(services, name)
    with pytest.raises(InvalidRequest, match="num_vectors_per_token: 1 to 75"):
        create(services, "many", num_vectors_per_token=76)
    assert not (folder.parent / "escape.pt").exists() and not (folder / "many.pt").exists()
    before = torch.load(folder / "taken.pt", weights_only=True)["string_to_param"]["*"]
    create(services, "taken", init_text="dog", overwrite_old=True)
    assert not torch.equal(torch.load(folder / "taken.pt", weights_only=True)["string_to_param"]["*"], before)


# --- the parts of a run ---------------------------------------------------------------------------
def test_the_learning_rate_schedule_reads_a1111s_syntax():
    one = RateSchedule.parse("0.005")
    assert [one.rate_at(done, 100) for done in (0, 99, 100)] == [0.005, 0.005, None] and one.end(100) == 100
    stepped = RateSchedule.parse("0.005:100, 1e-3:1000, 1e-5")
    assert [stepped.rate_at(done, 2000) for done in (0, 99, 100, 999, 1000, 1999, 2000)] == [
        0.005, 0.005, 0.001, 0.001, 1e-5, 1e-5, None]
    assert stepped.end(2000) == 2000 and stepped.end(500) == 500 and stepped.rate_at(499, 500) == 0.001
    ends_early = RateSchedule.parse("0.01:10")  # a last rate with a step ends the training there, as in A1111
    assert ends_early.end(50) == 10 and ends_early.rate_at(10, 50) is None
    assert RateSchedule.parse("0.01:10, 0.001:-1,").end(50) == 50  # -1: to the end; a comma at the end is nothing
    for bad, says in (("", "give a rate"), ("abc", "rate above 0"), ("0", "rate above 0"), ("-0.1", "rate above 0"),
                      ("nan", "rate above 0"), ("0.005:abc", "whole number"), ("0.005:0", "whole number"),
                      ("0.01:10:5", "whole number"), ("0.01:100, 0.001:50", "must grow"),
                      ("0.01, 0.001:100", "nothing may follow")):
        with pytest.raises(InvalidRequest, match=f"learn_rate: .*{says}"):
            RateSchedule.parse(bad)


def test_template_lines_take_the_name_and_the_filewords(dataset):
    line = "a photo of [name], [filewords]"
    assert prompt_text(line, "apple", "shiny, round") == "a photo of apple, shiny, round"
    assert prompt_text(line, "apple", "shiny, round", tag_drop_out=1.0) == "a photo of apple, "
    shuffled = prompt_text("[filewords]", "x", "a,b,c,d,e,f", shuffle_tags=True, rng=random.Random(3))
    assert sorted(shuffled.split(",")) == list("abcdef") and shuffled != "a,b,c,d,e,f"
    # A caption file beside the picture, else its name without A1111's leading numbers.
    assert filewords_of(dataset / "00000-a red apple 0.png") == "shiny, round"
    assert filewords_of(dataset / "00002-a red apple 2.png") == "a red apple 2"


def test_a_plan_reads_the_dataset_and_puts_the_log_under_the_outputs_folder(services, dataset):
    create(services, "planned")
    plan = plan_training(train_fields(dataset, "planned", learn_rate="0.01:2, 0.001"), services.settings,
                         today=dt.date(2024, 5, 17))
    assert [picture.path.name for picture in plan.pictures] == [f"0000{n}-a red apple {n}.png" for n in range(3)]
    assert plan.log_folder == services.settings.outdir / "textual_inversion" / "2024-05-17" / "planned"
    assert all("[name]" in line for line in plan.template if "[filewords]" in line)


def test_bad_training_inputs_are_refused_before_anything_is_queued(services, dataset, tmp_path):
    create(services, "refusals")
    (tmp_path / "empty").mkdir()
    (services.settings.outdir / "notes.txt").write_text("a file of the outputs folder, where no log folder can go")
    for fields, says in (
            ({"data_root": str(tmp_path / "missing")}, "data_root: .* is no folder"),
            ({"data_root": str(tmp_path / "empty")}, "data_root: .* holds no pictures"),
            ({"data_root": ""}, "data_root: give the folder"),
            ({"embedding_name": "nobody"}, "embedding_name: no embedding 'nobody'"),
            ({"embedding_name": "../refusals"}, "embedding_name: no embedding"),
            ({"log_directory": "../elsewhere"}, "log_directory: .* outside the outputs folder"),
            ({"log_directory": "/tmp/elsewhere"}, "log_directory: .* outside the outputs folder"),
            # These failed only when the run had trained, and a file on the way was said to be a full disk.
            ({"log_directory": "notes.txt"}, "log_directory: 'notes.txt' cannot hold the run's folder: notes.txt is "
                                             "a file in the outputs folder"),
            ({"log_directory": "notes.txt/deeper"}, "log_directory: .*notes.txt is a file"),
            ({"log_directory": "a\x00b"}, "log_directory: .* holds a null character"),
            ({"template_filename": "../style.txt"}, "template_filename: no prompt template"),
            ({"training_width": 100}, "training_width: must be a multiple of 8"),
            ({"batch_size": 4}, "batch_size: 4 is more than the 3 pictures"),
            ({"learn_rate": "fast"}, "learn_rate: 'fast' does not start with a rate above 0"),
            ({"clip_grad_mode": "norm", "clip_grad_value": "strong"},
             r"clip_grad_value: 'strong' does not start with a value above 0 \(such as 0.1"),
            ({"clip_grad_mode": "value", "clip_grad_value": ""}, "clip_grad_value: give a value such as 0.1,"),
            ({"steps": 0}, "steps: 1 to"),
            ({"latent_sampling_method": "sometimes"}, "latent_sampling_method: one of once, deterministic, random"),
            ({"varsize": True}, "varsize: .* send false")):
        with pytest.raises(InvalidRequest, match=says):
            plan_training(train_fields(dataset, "refusals", **fields), services.settings)
    hidden = dataclasses.replace(services.settings, hide_ui_dir_config=True)
    with pytest.raises(InvalidRequest, match="reads no folders"):
        plan_training(train_fields(dataset, "refusals"), hidden)
    # A damaged file was said to fit no model ("load the model it was made for"), after the run was queued.
    junk = services.settings.embeddings_folder / "junk.pt"
    junk.write_bytes(b"garbage, not an embedding")
    try:
        with pytest.raises(InvalidRequest, match=r"embedding_name: junk.pt cannot be read as an embedding "
                                                 r"\(unreadable \(UnpicklingError\)\); replace the file"):
            plan_training(train_fields(dataset, "junk"), services.settings)
    finally:
        junk.unlink()


# --- training on the worker -----------------------------------------------------------------------
def test_training_changes_the_embedding_alone_saves_copies_as_a1111_and_reloads_it(services, dataset):
    create(services, "trained", init_text="red apple", num_vectors_per_token=2)
    folder = services.settings.embeddings_folder
    start = torch.load(folder / "trained.pt", weights_only=True)["string_to_param"]["*"]
    pipe = services.engine.pipe
    frozen = {name: value.clone() for part in ("unet", "vae", "text_encoder")
              for name, value in getattr(pipe, part).state_dict(prefix=f"{part}.").items()}
    vocabulary = token_table(services).shape[0]
    run = train(services, dataset, "trained", steps=3, save_embedding_every=2, learn_rate="0.05", batch_size=2)

    assert run.state == "done" and run.outcome.step == 3 and torch.isfinite(torch.tensor(run.status.loss))
    data = torch.load(folder / "trained.pt", weights_only=True)
    trained = data["string_to_param"]["*"]
    assert data["step"] == 3 and data["sd_checkpoint_name"] == "tiny-sd" and data["sd_checkpoint"]
    assert (trained - start).abs().max() > 0.01  # Adam moves each vector about the rate per step
    # Nothing else learned: the UNet, the VAE and the text encoder (its token table up to the embeddings' rows).
    for name, value in pipe.unet.state_dict(prefix="unet.").items() | pipe.vae.state_dict(prefix="vae.").items():
        assert torch.equal(value, frozen[name]), name
    for name, value in pipe.text_encoder.state_dict(prefix="text_encoder.").items():
        assert torch.equal(value[:vocabulary], frozen[name][:vocabulary]), name
    assert all(parameter.requires_grad for parameter in pipe.unet.parameters())  # as the model was loaded
    # Every 2 steps a copy, named <name>-<step>.pt, in <log directory>/<date>/<name>/embeddings.
    copies = run.plan.log_folder / "embeddings"
    assert run.plan.log_folder.parent.parent == services.settings.outdir / "textual_inversion"
    assert sorted(path.name for path in copies.iterdir()) == ["trained-2.pt"]
    copy = torch.load(copies / "trained-2.pt", weights_only=True)
    assert copy["name"] == "trained-2" and copy["step"] == 2
    assert not torch.equal(copy["string_to_param"]["*"], trained)  # the third step came after it
    # Read in again: prompts use the trained vectors.
    loaded = services.engine.embeddings.loaded["trained"]
    assert loaded.step == 3 and torch.equal(token_table(services)[list(loaded.vector_ids)], trained)


def test_training_goes_on_from_the_embeddings_steps_and_makes_previews(services, dataset):
    create(services, "resumed")
    train(services, dataset, "resumed", steps=2)
    run = train(services, dataset, "resumed", steps=4, create_image_every=4, latent_sampling_method="random")
    assert (run.outcome.first_step, run.outcome.step) == (2, 4)
    preview = run.plan.log_folder / "images" / "resumed-4.png"
    assert run.preview_path == preview and preview.is_file() and run.preview_image.size == (64, 64)
    again = train(services, dataset, "resumed", steps=4)
    assert again.outcome.already_trained and "raise Max steps" in again.result()


def test_training_reads_prompts_with_the_settings_emphasis_and_word_wrap_limit(services, dataset, monkeypatch):
    import webui.engine.training as engine_training

    seen, real = [], engine_training.encode_prompt_pair

    def encode(pipe, prompts, negatives, clip_skip=1, emphasis="Original", backtrack=20):
        seen.append((emphasis, backtrack))
        return real(pipe, prompts, negatives, clip_skip, emphasis, backtrack)

    monkeypatch.setattr(engine_training, "encode_prompt_pair", encode)
    create(services, "read")
    before = services.options.current()
    services.options.update({"emphasis": "No norm", "comma_padding_backtrack": 5})
    try:
        run = train(services, dataset, "read", steps=1, create_image_every=1)
    finally:  # the module's other tests share these services
        services.options.update({"emphasis": before.emphasis, "comma_padding_backtrack": before.comma_padding_backtrack})
    assert run.outcome.step == 1 and seen and set(seen) == {("No norm", 5)}
    assert (run.plan.emphasis, run.plan.comma_backtrack) == ("No norm", 5)  # the preview's request reads them too


def test_interrupt_stops_the_run_keeps_its_files_and_leaves_other_jobs_alone(services, dataset):
    create(services, "stopped")
    run = TrainingRun(plan_training(train_fields(dataset, "stopped", steps=100000, save_embedding_every=1),
                                    services.settings))
    future = services.worker.train(run)
    other = services.worker.submit({"prompt": "a pear", "steps": 2, "width": 64, "height": 64}, owner="someone")
    wait_for(lambda: run.status is not None and run.status.step >= 2, what="two training steps")
    assert services.worker.training is run and other.state is JobState.QUEUED
    assert "other jobs wait" in services.worker.activity
    run.stop()
    outcome = future.result(60)
    assert outcome.stopped and 2 <= outcome.step < 100000 and run.state == "interrupted"
    saved = torch.load(outcome.path, weights_only=True)
    assert saved["step"] == outcome.step
    assert (run.plan.log_folder / "embeddings" / f"stopped-{outcome.step}.pt").is_file()
    assert other.wait(60) and other.state is JobState.DONE  # someone else's job ran after it, untouched


def test_a_run_stopped_while_queued_never_starts(services, dataset):
    create(services, "never")
    run = TrainingRun(plan_training(train_fields(dataset, "never"), services.settings))
    run.stop()
    assert services.worker.train(run).result(60) is None
    assert run.state == "interrupted" and "before its first step" in run.result()
    assert torch.load(services.settings.embeddings_folder / "never.pt", weights_only=True)["step"] == 0


# --- the API ----------------------------------------------------------------------------------------
def test_the_api_creates_trains_reports_progress_and_interrupts(services, dataset):
    with TestClient(create_api_app(services)) as client:
        made = client.post("/sdapi/v1/create/embedding", json={"name": "viaapi", "num_vectors_per_token": 2,
                                                                "overwrite_old": False, "init_text": "pear"})
        assert made.status_code == 200
        path = services.settings.embeddings_folder / "viaapi.pt"
        assert made.json() == {"info": f"create embedding filename: {path}"}
        again = client.post("/sdapi/v1/create/embedding", json={"name": "viaapi"})
        assert again.status_code == 422 and "overwrite_old: true" in again.json()["detail"]
        assert client.post("/sdapi/v1/create/embedding", json={"name": "../x"}).status_code == 422

        body = {"embedding_name": "viaapi", "learn_rate": 0.01, "batch_size": 1, "gradient_step": 2,
                "data_root": str(dataset), "log_directory": "textual_inversion", "training_width": 64,
                "training_height": 64, "steps": 2, "create_image_every": 0, "save_embedding_every": 0,
                "template_filename": "style_filewords.txt", "id_task": "task(abc)", "varsize": False}
        done = client.post("/sdapi/v1/train/embedding", json=body)
        assert done.status_code == 200
        assert done.json() == {"info": f"train embedding complete: filename: {path} error: None"}
        assert torch.load(path, weights_only=True)["step"] == 2
        refused = client.post("/sdapi/v1/train/embedding", json=body | {"data_root": str(dataset / "none")})
        assert refused.status_code == 422 and refused.json()["detail"].startswith("data_root:")

        # the step it stops at: the learning rate's schedule ends before Max steps (found by a probe)
        progress, answer = interrupted_api_training(client, services, "/sdapi/v1/train/embedding",
                                                    body | {"learn_rate": "0.01:50000"})
        assert progress["state"]["job"] == "train-embedding" and progress["state"]["job_count"] == 50000
        assert progress["state"]["job_no"] >= 3 and "Loss: " in progress["textinfo"]
        assert answer.status_code == 200 and answer.json()["info"].endswith("error: None")
        assert 3 <= torch.load(path, weights_only=True)["step"] < 100000


def test_an_api_caller_with_a_login_trains_on_a_server_folder_the_page_may_not_name(services, dataset):
    """--listen --api-auth: the page (no --gradio-auth) reads no server folders, but the API has a login of its own,
    and A1111's API trains on any folder; it was refused with the page's rule. Found by a black-box probe."""
    create(services, "loggedin")
    served = dataclasses.replace(services.settings, listen=True, api_auth=[("u", "p")])
    body = {"embedding_name": "loggedin", "data_root": str(dataset), "training_width": 64, "training_height": 64,
            "steps": 2, "create_image_every": 0, "save_embedding_every": 0}
    with TestClient(create_api_app(dataclasses.replace(services, settings=served))) as client:
        done = client.post("/sdapi/v1/train/embedding", json=body, auth=("u", "p"))
    assert done.status_code == 200, done.text
    assert done.json()["info"].endswith("error: None")
    with pytest.raises(InvalidRequest, match="data_root: this server reads no folders named from the page"):
        plan_training(TrainEmbedding(**body), served)  # the page's rule stands for the page
    # An API anyone reaches without a login names no server folders either.
    open_api = dataclasses.replace(served, api_auth=[])
    with TestClient(create_api_app(dataclasses.replace(services, settings=open_api))) as client:
        refused = client.post("/sdapi/v1/train/embedding", json=body)
    assert refused.status_code == 422 and refused.json()["detail"].startswith("data_root: this server's API has no "
                                                                              "login")
    assert "--api-auth" in refused.json()["detail"]


# --- the page -------------------------------------------------------------------------------------
def test_the_train_tab_creates_and_trains(services, dataset):
    with gr.Blocks():
        tab = build_train_tab(services)
    assert tab.fields["learn_rate"].value == "0.005" and tab.fields["log_directory"].value == "textual_inversion"
    assert tab.template.value == "style_filewords.txt"
    message, dropdown = tab.actions.create("pagemade", "apple", 1, False)
    assert "Created pagemade.pt" in message and dropdown["value"] == "pagemade"
    assert "pagemade.pt exists" in tab.actions.create("pagemade", "apple", 1, False)[0]
    values = dict(embedding_name="pagemade", learn_rate="0.005", clip_grad_mode="disabled", clip_grad_value="0.1",
                  batch_size=1, gradient_step=1, data_root=str(dataset), log_directory="textual_inversion",
                  template_filename="subject.txt", training_width=64, training_height=64, steps=2,
                  create_image_every=0, save_embedding_every=0, shuffle_tags=False, tag_drop_out=0.0,
                  latent_sampling_method="once")
    session = TrainSession(tab="page-token")
    *_, last = tab.actions.train(session, *(values[name] for name in tab.fields))
    assert "Training finished at 2 steps" in last[3] and session.run.owner == "ui-tab:page-token"
    assert last[1] == ""  # the progress line (its last step and ETA) goes with the result (found by a probe)
    *_, refused = tab.actions.train(session, *((values | {"data_root": ""})[name] for name in tab.fields))
    assert "Dataset directory: give the folder" in refused[3]
    # A page reloaded in the same browser tab follows its run again, and its Interrupt stops it.
    first = TrainSession(tab="reloaded")
    following = tab.actions.train(first, *((values | {"steps": 100000})[name] for name in tab.fields))
    next(following)
    wait_for(lambda: first.run.status is not None, what="the page's training")
    following.close()  # the page went away; the run goes on
    again = TrainSession()
    resumed = tab.actions.resume(again, "reloaded")
    next(resumed)
    assert again.run is first.run and not first.run.finished
    tab.actions.interrupt(again)
    *_, last = resumed
    assert "Training interrupted at" in last[3] and first.run.outcome.stopped and last[1] == ""
    # A page opened anew (another browser tab, the page closed and opened again) follows a training whose page went
    # away, and can stop it: else it would hold the queue until it ends. Not on a server open to anyone.
    closed = TrainSession(tab="closed")
    following = tab.actions.train(closed, *((values | {"steps": 100000})[name] for name in tab.fields))
    next(following)
    wait_for(lambda: closed.run.status is not None, what="the closed page's training")
    following.close()
    shared = dataclasses.replace(services, settings=dataclasses.replace(services.settings, share=True))
    stranger = TrainSession()
    assert list(build_train_tab_actions(shared, tab).resume(stranger, "a-stranger")) == [
        (stranger, gr.skip(), gr.skip(), gr.skip())] and stranger.run is None
    newcomer = TrainSession()
    resumed = tab.actions.resume(newcomer, "a-new-tab")
    next(resumed)
    assert newcomer.run is closed.run
    tab.actions.interrupt(newcomer)
    *_, last = resumed
    assert "Training interrupted at" in last[3] and closed.run.outcome.stopped
    locked = dataclasses.replace(services, settings=dataclasses.replace(services.settings, hide_ui_dir_config=True))
    with gr.Blocks():
        hidden = build_train_tab(locked)
    assert hidden.train.interactive is False and hidden.fields["data_root"].interactive is False


def test_the_eta_of_a_long_training_shows_hours():
    """A run of many steps showed ETA 10530m 55s."""
    assert format_seconds(631855) == "175h 30m"
    assert format_seconds(3600) == "1h 00m" and format_seconds(3599) == "59m 59s"
    assert format_seconds(65) == "1m 05s" and format_seconds(4.4) == "4s" and format_seconds(None) == "?"


def build_train_tab_actions(services, tab):
    """The tab's actions with the same runs, on other services (settings)."""
    from webui.ui.train import TrainActions

    actions = TrainActions(services)
    actions.runs = tab.actions.runs
    return actions


def test_a_batch_whose_prompts_never_name_the_embedding_trains_nothing_and_fails_nothing(services, dataset):
    create(services, "unnamed")
    plan = plan_training(train_fields(dataset, "unnamed", steps=2), services.settings)
    run = TrainingRun(dataclasses.replace(plan, template=("a plain picture",)))
    before = torch.load(services.settings.embeddings_folder / "unnamed.pt", weights_only=True)["string_to_param"]["*"]
    assert services.worker.train(run).result(60).step == 2
    after = torch.load(services.settings.embeddings_folder / "unnamed.pt", weights_only=True)["string_to_param"]["*"]
    assert torch.equal(after, before)


def test_a_picture_that_cannot_be_read_fails_the_run_with_its_name_and_leaves_the_embedding(services, tmp_path):
    create(services, "broken")
    noise_picture(1).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    run = TrainingRun(plan_training(train_fields(tmp_path, "broken", batch_size=1), services.settings))
    with pytest.raises(InvalidRequest, match="data_root: bad.png cannot be read as a picture"):
        services.worker.train(run).result(60)
    assert run.state == "failed" and "bad.png" in run.result()
    assert torch.load(services.settings.embeddings_folder / "broken.pt", weights_only=True)["step"] == 0


def test_a_file_that_cannot_be_written_is_said_in_words_and_logged(services, dataset, monkeypatch, caplog):
    """torch.save's own message for a full disk ("basic_ios::clear: iostream error") says nothing of what to do."""
    from webui import training

    create(services, "full")

    def disk_full(engine, plan, run):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: basic_ios::clear: "
                           "iostream error")

    monkeypatch.setitem(training.TRAINERS, "embedding", disk_full)
    run = TrainingRun(plan_training(train_fields(dataset, "full"), services.settings))
    with caplog.at_level("ERROR", logger="webui.training"), pytest.raises(RuntimeError):
        services.worker.train(run).result(60)
    assert run.state == "failed" and "is the disk full, or the folder read-only?" in run.error
    assert any(record.exc_info and "training full failed" in record.getMessage() for record in caplog.records)
    assert training._failure_text(OSError(28, "No space left on device", "/out/full.pt")) == (
        "could not write or read a file (/out/full.pt): No space left on device; free some disk space or make the "
        "folder writable")


def test_a_run_that_fails_after_a_preview_leaves_the_prompts_reading_the_file_as_it_was(services, dataset):
    """A preview puts the vectors being trained into the token table; a run that then fails writes no file, so the
    table must read as the file again, and a picture of the embedding be the one it was before the run."""
    create(services, "previewed", init_text="red apple")
    request = {"prompt": "a photo of previewed", "steps": 2, "width": 64, "height": 64, "seed": 5}
    before = np.asarray(finished_job(services, request).images[0].image)
    plan = plan_training(train_fields(dataset, "previewed", steps=5, create_image_every=1, save_embedding_every=2,
                                      learn_rate="0.5"), services.settings)
    plan.copies_folder.parent.mkdir(parents=True, exist_ok=True)
    plan.copies_folder.write_text("a file where the copies' folder would go: the copy at step 2 fails")
    run = TrainingRun(plan)
    with pytest.raises(OSError):
        services.worker.train(run).result(120)
    assert run.state == "failed" and run.preview_step == 1  # a preview came before the failure
    loaded = services.engine.embeddings.loaded["previewed"]
    saved = torch.load(services.settings.embeddings_folder / "previewed.pt", weights_only=True)
    assert saved["step"] == 0
    assert torch.equal(token_table(services)[list(loaded.vector_ids)].detach(), saved["string_to_param"]["*"])
    after = np.asarray(finished_job(services, request).images[0].image)
    assert np.array_equal(after, before)


def test_an_api_training_that_fails_as_it_runs_answers_as_a1111_with_the_error_in_its_info(services, dataset):
    """A1111's route answers 200 and puts what went wrong in info; a 500 leaves a client reading info with nothing."""
    create(services, "apifails")
    body = {"embedding_name": "apifails", "data_root": str(dataset), "training_width": 64, "training_height": 64,
            "steps": 3, "create_image_every": 0, "save_embedding_every": 1,
            "template_filename": "subject_filewords.txt"}
    plan = plan_training(TrainEmbedding(**body), services.settings)
    plan.copies_folder.parent.mkdir(parents=True, exist_ok=True)
    plan.copies_folder.write_text("a file where the copies' folder would go")
    with TestClient(create_api_app(services)) as client:
        answer = client.post("/sdapi/v1/train/embedding", json=body)
    assert answer.status_code == 200, answer.text
    info = answer.json()["info"]
    assert info.startswith("train embedding complete: filename:  error: ") and not info.endswith("error: None")
    assert torch.load(services.settings.embeddings_folder / "apifails.pt", weights_only=True)["step"] == 0


def test_training_adds_noise_on_the_models_own_schedule_after_a_zero_terminal_snr_picture(services, dataset,
                                                                                         monkeypatch):
    """The training noise was read from the pipeline's scheduler, the last picture's pass's: after a Zero Terminal
    SNR run, its rescaled betas (alpha bar 5e-8 at the end, not the model's 0.0047). Found by review."""
    import webui.engine.training as engine_training
    from tests.helpers import finished_job

    noises, real = [], engine_training._Trainer.__init__

    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        noises.append(self.noise.alphas_cumprod[-1].item())

    monkeypatch.setattr(engine_training._Trainer, "__init__", recording)
    model_end = services.engine.sigma_table().max()  # the model's own largest sigma
    finished_job(services, {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1, "save_images": False,
                            "sampler_name": "DDIM", "sd_noise_schedule": "Zero Terminal SNR"})
    create(services, "ztsnr")
    train(services, dataset, "ztsnr", steps=1)
    alpha_bar = 1 / (1 + model_end ** 2)
    assert noises and abs(noises[0] - alpha_bar) < 1e-6 * max(1.0, alpha_bar) + 1e-9, (noises, alpha_bar)
