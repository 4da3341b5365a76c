"""The Train tab for hypernetworks (A1111's): Create hypernetwork (its file in A1111's layout, read by our reader),
Train Hypernetwork on the worker (the networks learn, the model does not; copies, previews, Interrupt), their API
routes, the page, and refusals of bad input.

Runs on the tiny model (tests/tiny_sd.py), whose attentions all read 32 wide, with 16x16 pictures trained at 64x64
and a few steps.
"""
from __future__ import annotations

import math
import threading
import time

import gradio as gr
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.helpers import (
    finished_job, interrupted_api_training, noise_picture, running_services, wait_for,
)
from webui.api import create_api_app
from webui.engine.hypernetworks import HypernetworkFile, read_hypernetwork
from webui.engine.training import TrainingError
from webui.hypernetwork_training import (
    NewHypernetwork, TrainHypernetwork, create_hypernetwork, plan_hypernetwork_training,
)
from webui.schemas import InvalidRequest, JobState
from webui.training import TrainingRun
from webui.ui.train import TrainSession, build_train_tab

WIDTH = 32  # the tiny model's attention width
A1111_FIELDS = {"step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                "last_layer_dropout", "optional_info"}


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-hn")
    yield from running_services(models_dir, root / "outputs", hypernetwork_dir=root / "hypernetworks")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hn-dataset")
    for number in range(2):
        noise_picture(number, 16, 16).save(folder / f"{number:05d}-a green pear {number}.png")
    return folder


def folder_of(services):
    return services.settings.hypernetwork_folder


def create(services, name: str, **fields):
    return create_hypernetwork(NewHypernetwork(name=name, **({"enable_sizes": [WIDTH]} | fields)), folder_of(services))


def train_fields(dataset, name: str, **fields) -> TrainHypernetwork:
    defaults = dict(hypernetwork_name=name, data_root=str(dataset), training_width=64, training_height=64, steps=3,
                    create_image_every=0, save_hypernetwork_every=0, template_filename="subject_filewords.txt",
                    learn_rate="0.01")
    return TrainHypernetwork(**(defaults | fields))


def plan(services, dataset, name: str, **fields):
    return plan_hypernetwork_training(train_fields(dataset, name, **fields), services.settings)


def train(services, dataset, name: str, **fields) -> TrainingRun:
    run = TrainingRun(plan(services, dataset, name, **fields))
    services.worker.train(run).result(120)
    return run


def networks(path) -> dict:
    return {key: value for key, value in torch.load(path, weights_only=True).items() if isinstance(key, int)}


def picture(services, prompt: str) -> np.ndarray:
    job = finished_job(services, {"prompt": prompt, "steps": 3, "seed": 5, "sampler_name": "Euler", "width": 64,
                                  "height": 64})
    return np.asarray(job.images[0].image, np.int16)


# --- Create hypernetwork --------------------------------------------------------------------------
def test_a_created_hypernetwork_is_a1111s_pt_and_our_reader_reads_it(services):
    path = create(services, "fresh", enable_sizes=[WIDTH, "768"], layer_structure="1, 2, 1", activation_func="relu",
                  add_layer_norm=True, use_dropout=True, dropout_structure="0, 0.1, 0")
    assert path == folder_of(services) / "fresh.pt" and not list(path.parent.glob(".partial-*"))
    state = torch.load(path, map_location="cpu", weights_only=True)  # no code runs: A1111's plain layout
    assert set(state) == A1111_FIELDS | {WIDTH, 768}
    assert state["layer_structure"] == [1, 2, 1] and state["activation_func"] == "relu"
    assert state["is_layer_norm"] is True and state["weight_initialization"] == "Normal"
    assert state["use_dropout"] is True and state["dropout_structure"] == [0, 0.1, 0]
    assert state["last_layer_dropout"] is True and state["activate_output"] is False  # A1111's for a new one
    assert state["step"] == 0 and state["name"] == "fresh" and state["sd_checkpoint"] is None
    # A1111's Sequential for 1, 2, 1 with relu, layer norm and dropout 0.1 after the middle layer, no activation at
    # the output: 0 Linear(w, 2w), 1 ReLU, 2 LayerNorm(2w), 3 Dropout, 4 Linear(2w, w), 5 LayerNorm(w).
    key, value = state[WIDTH]
    shapes = {"linear.0.weight": (64, 32), "linear.0.bias": (64,), "linear.2.weight": (64,), "linear.2.bias": (64,),
              "linear.4.weight": (32, 64), "linear.4.bias": (32,), "linear.5.weight": (32,), "linear.5.bias": (32,)}
    assert {name: tuple(tensor.shape) for name, tensor in key.items()} == shapes
    assert {name: tuple(tensor.shape) for name, tensor in value.items()} == shapes
    assert state[768][0]["linear.4.weight"].shape == (768, 1536)
    # A1111's Normal: weights (layer norms' too) N(0, 0.01), biases 0; key and value drawn apart.
    for name in ("linear.0.weight", "linear.4.weight", "linear.2.weight"):
        assert 0.007 < key[name].std().item() < 0.013, name
    assert all(not tensor.any() for name, tensor in key.items() if name.endswith("bias"))
    assert not torch.equal(key["linear.0.weight"], value["linear.0.weight"])
    loaded = read_hypernetwork(HypernetworkFile("fresh", path))
    assert sorted(loaded.layers) == [WIDTH, 768]
    assert torch.equal(loaded.layers[WIDTH][1].linear[4].weight, value["linear.4.weight"])


def test_the_weight_initializations_are_a1111s(services):
    xavier = networks(create(services, "xavier", layer_structure="1, 1.5, 1", weight_init="XavierUniform"))
    weight = xavier[WIDTH][0]["linear.0.weight"]  # 32 -> 48
    bound = math.sqrt(6 / (32 + 48))
    assert weight.shape == (48, 32) and weight.abs().max() <= bound and weight.abs().max() > 0.8 * bound
    kaiming = networks(create(services, "kaiming", weight_init="KaimingNormal", activation_func="leakyrelu"))
    std = kaiming[WIDTH][0]["linear.0.weight"].std().item()  # leaky ReLU's gain sqrt(2 / 1.0001) over sqrt(fan_in)
    assert abs(std - math.sqrt(2 / 1.0001) / math.sqrt(32)) < 0.03
    assert not kaiming[WIDTH][0]["linear.0.bias"].any()
    # An activation with weights of its own (PReLU) is written, and read back, at its index.
    prelu = create(services, "prelu", activation_func="prelu", layer_structure="1, 2, 1")
    assert "linear.1.weight" in networks(prelu)[WIDTH][0]
    assert sorted(read_hypernetwork(HypernetworkFile("prelu", prelu)).layers) == [WIDTH]


def test_bad_new_hypernetworks_are_refused_and_overwrite_replaces(services):
    folder = folder_of(services)
    create(services, "taken")
    for fields, says in (({"layer_structure": "1, 2"}, "layer_structure: .*must start and end with 1"),
                         ({"layer_structure": "2, 1, 1"}, "layer_structure: .*must start and end with 1"),
                         ({"layer_structure": "1, 0, 1"}, "layer_structure: .*above 0"),
                         ({"layer_structure": "1, x, 1"}, "layer_structure: .*not numbers"),
                         ({"layer_structure": "1, 1000000, 1"}, "layer_structure: .*at most"),
                         ({"layer_structure": "1, 1e308, 1"}, "layer_structure: .*at most"),  # overflowed
                         ({"activation_func": "wobble"}, "activation_func: one of linear, relu"),
                         ({"activation_func": "threshold"}, "activation_func: one of"),
                         ({"weight_init": "Uniform"}, "weight_init: one of Normal, KaimingUniform"),
                         ({"enable_sizes": []}, "enable_sizes: pick the widths"),
                         ({"enable_sizes": ["big"]}, "enable_sizes: pick the widths"),
                         ({"use_dropout": True, "dropout_structure": "0, 0.5"}, "dropout_structure: .*each of the 3"),
                         ({"use_dropout": True, "dropout_structure": "0, 1, 0"}, "dropout_structure: .*below 1"),
                         ({"use_dropout": True, "dropout_structure": "0.1, 0.1, 0"}, "dropout_structure: .*first")):
        with pytest.raises(InvalidRequest, match=says):
            create(services, "refused", **fields)
    for name, says in (("../escape", "no /"), ("sub/name", "no /"), ("..", "no /"), ("", "give the hypernetwork a "
                       "name"), ("taken", "taken.pt exists .*overwrite_old: true"),
                       ("None", "None stands for no hypernetwork"), (" None ", "None stands for no hypernetwork")):
        with pytest.raises(InvalidRequest, match=f"name: .*{says}"):
            create(services, name)
    assert not (folder / "refused.pt").exists() and not (folder.parent / "escape.pt").exists()
    assert not (folder / "None.pt").exists()  # the lists leave it out: it could never be used
    # Without use_dropout the dropout structure is not read, as in A1111.
    assert networks(create(services, "nodropout", dropout_structure="0, 0.9"))
    before = networks(folder / "taken.pt")[WIDTH][0]["linear.0.weight"]
    create(services, "taken", overwrite_old=True)
    assert not torch.equal(networks(folder / "taken.pt")[WIDTH][0]["linear.0.weight"], before)


def test_simultaneous_creates_of_one_new_name_make_one_file_and_refuse_the_others(services, monkeypatch):
    """The API runs Create on FastAPI's threads: four at once each found the name free, all answered 200 and the last
    file stayed. Found by a black-box probe."""
    from webui import hypernetwork_training

    real_save = hypernetwork_training.save_whole

    def slow_save(path, data):  # widens the time between the check and the file, as a large file's writing does
        time.sleep(0.2)
        real_save(path, data)

    monkeypatch.setattr(hypernetwork_training, "save_whole", slow_save)
    start, outcomes = threading.Barrier(4), {}

    def make(seed: int) -> None:
        start.wait()
        try:
            outcomes[seed] = create(services, "raced", layer_structure=f"1, {2 + seed}, 1")
        except InvalidRequest as err:
            outcomes[seed] = str(err)

    threads = [threading.Thread(target=make, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    made = [seed for seed, outcome in outcomes.items() if not isinstance(outcome, str)]
    refused = [outcome for outcome in outcomes.values() if isinstance(outcome, str)]
    assert len(made) == 1 and len(refused) == 3, outcomes
    assert all("name: raced.pt exists" in message for message in refused)
    # The file is the one whose Create was answered, not another written over it.
    assert torch.load(outcomes[made[0]], weights_only=True)["layer_structure"] == [1, 2 + made[0], 1]


# --- Train ----------------------------------------------------------------------------------------
def test_training_changes_the_networks_alone_saves_a1111_copies_and_changes_the_pictures(services, dataset):
    path = create(services, "trained", weight_init="XavierNormal", activation_func="swish")
    start = networks(path)[WIDTH]
    pipe = services.engine.pipe
    frozen = {name: value.clone() for part in ("unet", "vae", "text_encoder")
              for name, value in getattr(pipe, part).state_dict(prefix=f"{part}.").items()}
    plain, bent_before = picture(services, "a green pear"), picture(services, "a green pear <hypernet:trained>")
    run = train(services, dataset, "trained", steps=3, save_hypernetwork_every=1, batch_size=2)

    assert run.state == "done" and run.outcome.step == 3 and math.isfinite(run.status.loss)
    state = torch.load(path, weights_only=True)
    assert set(state) == A1111_FIELDS | {WIDTH}
    assert state["step"] == 3 and state["name"] == "trained" and state["sd_checkpoint_name"] == "tiny-sd"
    assert state["sd_checkpoint"] == services.engine.require_model().short_hash
    assert state["weight_initialization"] == "XavierNormal" and state["activation_func"] == "swish"
    for part in (0, 1):  # the key's and the value's networks both learned (Adam moves each weight ~ the rate)
        assert max((state[WIDTH][part][name] - start[part][name]).abs().max() for name in start[part]) > 0.005
    for name, value in [*pipe.unet.state_dict(prefix="unet.").items(), *pipe.vae.state_dict(prefix="vae.").items(),
                        *pipe.text_encoder.state_dict(prefix="text_encoder.").items()]:
        assert torch.equal(value, frozen[name]), name
    assert all(parameter.requires_grad for parameter in pipe.unet.parameters())  # as the model was loaded
    assert sum(len(module._forward_pre_hooks) for module in pipe.unet.modules()) == 0  # no hook left on
    # A copy every step, in <log directory>/<date>/<name>/hypernetworks, keeping the hypernetwork's name.
    copies = run.plan.log_folder / "hypernetworks"
    assert sorted(p.name for p in copies.iterdir()) == ["trained-1.pt", "trained-2.pt", "trained-3.pt"]
    first = torch.load(copies / "trained-1.pt", weights_only=True)
    assert first["step"] == 1 and first["name"] == "trained" and set(first) == A1111_FIELDS | {WIDTH}
    assert not torch.equal(first[WIDTH][0]["linear.0.weight"], state[WIDTH][0]["linear.0.weight"])
    # Prompts use the trained file; the model without it draws as before.
    assert np.abs(picture(services, "a green pear <hypernet:trained>") - bent_before).max() > 0
    assert np.array_equal(picture(services, "a green pear"), plain)


def test_training_goes_on_from_its_step_and_makes_previews(services, dataset):
    create(services, "resumed")
    train(services, dataset, "resumed", steps=1)
    run = train(services, dataset, "resumed", steps=2, create_image_every=2, latent_sampling_method="deterministic")
    assert run.outcome.first_step == 1 and run.outcome.step == 2
    preview = run.plan.log_folder / "images" / "resumed-2.png"
    assert preview.is_file() and run.preview_image is not None and run.preview_image.size == (64, 64)
    again = train(services, dataset, "resumed", steps=2)
    assert again.outcome.already_trained and "raise Max steps" in again.result()


def test_interrupt_stops_the_run_keeps_its_file_and_the_next_job_runs(services, dataset):
    create(services, "stopped")
    run = TrainingRun(plan(services, dataset, "stopped", steps=100000))
    future = services.worker.train(run)
    other = services.worker.submit({"prompt": "a pear", "steps": 2, "width": 64, "height": 64}, owner="someone")
    wait_for(lambda: run.status is not None and run.status.step >= 2, what="two training steps")
    assert services.worker.training is run and other.state is JobState.QUEUED
    assert "Training hypernetwork stopped" in services.worker.activity
    run.stop()
    outcome = future.result(60)
    assert outcome.stopped and 2 <= outcome.step < 100000 and run.state == "interrupted"
    assert torch.load(outcome.path, weights_only=True)["step"] == outcome.step
    assert "Hypernetwork saved to" in run.result()
    assert other.wait(60) and other.state is JobState.DONE


def test_a_hypernetwork_training_now_is_not_created_over(services, dataset):
    """Overwriting it while it trained answered 200, and the run's end wrote its own file back over the new one.
    Found by a black-box probe."""
    create(services, "busy")
    run = TrainingRun(plan(services, dataset, "busy", steps=100000))
    future = services.worker.train(run)
    wait_for(lambda: run.status is not None, what="a training step")
    with pytest.raises(InvalidRequest, match="name: busy is training now.* Interrupt the training first"):
        create_hypernetwork(NewHypernetwork(name="busy", enable_sizes=[WIDTH], overwrite_old=True),
                            folder_of(services), services.worker.training)
    with TestClient(create_api_app(services)) as client:
        refused = client.post("/sdapi/v1/create/hypernetwork", json={"name": "busy", "enable_sizes": [WIDTH],
                                                                      "overwrite_old": True})
        assert refused.status_code == 422 and "busy is training now" in refused.json()["detail"]
        with gr.Blocks():
            tab = build_train_tab(services)
        defaults = [component.value for component in tab.new_hypernetwork.inputs]
        assert "busy is training now" in tab.actions.create_hypernetwork("busy", *defaults[1:-1], True)[0]
        run.stop()
        assert future.result(60).stopped
        made = client.post("/sdapi/v1/create/hypernetwork", json={"name": "busy", "enable_sizes": [WIDTH],
                                                                   "overwrite_old": True})
    assert made.status_code == 200 and torch.load(folder_of(services) / "busy.pt", weights_only=True)["step"] == 0


def test_bad_training_inputs_are_refused(services, dataset, tmp_path):
    create(services, "refusals")
    for fields, says in (({"data_root": str(tmp_path / "missing")}, "data_root: .* is no folder"),
                         ({"hypernetwork_name": "nobody"}, "hypernetwork_name: no hypernetwork 'nobody'"),
                         ({"hypernetwork_name": "../refusals"}, "hypernetwork_name: no hypernetwork"),
                         ({"hypernetwork_name": ""}, "hypernetwork_name: pick the hypernetwork"),
                         ({"save_hypernetwork_every": -1}, "save_hypernetwork_every: 0 to"),
                         ({"learn_rate": "0"}, "learn_rate: .*rate above 0")):
        with pytest.raises(InvalidRequest, match=says):
            plan(services, dataset, "refusals", **fields)
    # Networks for widths the model has none of: nothing would train; the run says so and the file stays.
    create_hypernetwork(NewHypernetwork(name="wide", enable_sizes=[768]), folder_of(services))
    run = TrainingRun(plan(services, dataset, "wide"))
    with pytest.raises(TrainingError, match="hypernetwork_name: wide has networks for widths 768.* read 32"):
        services.worker.train(run).result(60)
    assert run.state == "failed" and torch.load(folder_of(services) / "wide.pt", weights_only=True)["step"] == 0


# --- the API and the page -------------------------------------------------------------------------
def test_the_api_creates_trains_reports_progress_and_interrupts(services, dataset):
    with TestClient(create_api_app(services)) as client:
        new = {"name": "viaapi", "enable_sizes": [WIDTH], "overwrite_old": False, "layer_structure": "1, 2, 1",
               "activation_func": "linear", "weight_init": "Normal", "add_layer_norm": False, "use_dropout": False,
               "dropout_structure": "0, 0, 0"}
        made = client.post("/sdapi/v1/create/hypernetwork", json=new)
        path = folder_of(services) / "viaapi.pt"
        assert made.status_code == 200 and made.json() == {"info": f"create hypernetwork filename: {path}"}
        assert "viaapi" in [item["name"] for item in client.get("/sdapi/v1/hypernetworks").json()]
        again = client.post("/sdapi/v1/create/hypernetwork", json=new)
        assert again.status_code == 422 and "overwrite_old: true" in again.json()["detail"]
        bad = client.post("/sdapi/v1/create/hypernetwork", json=new | {"name": "other", "layer_structure": "2, 1, 1"})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("layer_structure:")

        body = {"hypernetwork_name": "viaapi", "learn_rate": 0.001, "batch_size": 1, "gradient_step": 2,
                "data_root": str(dataset), "log_directory": "textual_inversion", "training_width": 64,
                "training_height": 64, "steps": 2, "clip_grad_mode": "norm", "clip_grad_value": "1.0",
                "create_image_every": 0, "save_hypernetwork_every": 0, "template_filename": "style_filewords.txt",
                "id_task": "task(abc)", "varsize": False, "preview_prompt": ""}
        done = client.post("/sdapi/v1/train/hypernetwork", json=body)
        assert done.status_code == 200
        assert done.json() == {"info": f"train embedding complete: filename: {path} error: None"}  # A1111's words
        assert torch.load(path, weights_only=True)["step"] == 2
        refused = client.post("/sdapi/v1/train/hypernetwork", json=body | {"data_root": str(dataset / "none")})
        assert refused.status_code == 422 and refused.json()["detail"].startswith("data_root:")

        progress, answer = interrupted_api_training(client, services, "/sdapi/v1/train/hypernetwork", body)
        assert progress["state"]["job"] == "train-hypernetwork" and progress["state"]["job_count"] == 100000
        assert "Last saved hypernetwork" in progress["textinfo"]
        assert answer.status_code == 200 and answer.json()["info"].endswith("error: None")
        assert 3 <= torch.load(path, weights_only=True)["step"] < 100000


def test_the_train_tab_creates_and_trains_hypernetworks(services, dataset):
    with gr.Blocks():
        tab = build_train_tab(services)
    new = tab.new_hypernetwork
    assert new.sizes.value == ["768", "320", "640", "1280"] and new.layer_structure.value == "1, 2, 1"
    assert new.activation.value == "linear" and new.weight_init.value == "Normal"
    assert tab.hypernetwork_fields["learn_rate"].value == "0.00001"
    assert tab.hypernetwork_fields["data_root"] is tab.fields["data_root"]  # one set of fields serves both
    defaults = [component.value for component in new.inputs]
    message, dropdown = tab.actions.create_hypernetwork("pagemade", *defaults[1:])
    assert "Created pagemade.pt" in message and dropdown["value"] == "pagemade"
    assert "pagemade" in dropdown["choices"]
    assert "pagemade.pt exists" in tab.actions.create_hypernetwork("pagemade", *defaults[1:])[0]
    refused, _ = tab.actions.create_hypernetwork("other", defaults[1], "1, 2", *defaults[3:])
    assert "Enter hypernetwork layer structure: " in refused
    no_sizes, _ = tab.actions.create_hypernetwork("other", [], *defaults[2:])
    assert "Modules: pick the widths to make networks for, whole numbers" in no_sizes  # named once, not twice
    create(services, "pagetrained")
    values = {name: component.value for name, component in tab.hypernetwork_fields.items()} | dict(
        hypernetwork_name="pagetrained", learn_rate="0.001", data_root=str(dataset), training_width=64,
        training_height=64, steps=2, create_image_every=0, save_hypernetwork_every=0)
    session = TrainSession(tab="page-token")
    *_, last = tab.actions.train_hypernetwork(session, *values.values())
    assert "Training finished at 2 steps. Hypernetwork saved to" in last[3]
    assert torch.load(folder_of(services) / "pagetrained.pt", weights_only=True)["step"] == 2
    *_, refused = tab.actions.train_hypernetwork(session, *(values | {"learn_rate": "fast"}).values())
    assert "Hypernetwork Learning rate: " in refused[3] and "does not start with a rate" in refused[3]
