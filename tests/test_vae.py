"""SD VAE: a VAE file of the VAE folder used instead of the model's own (webui/engine/vae.py), chosen per job from
the page, the API and an infotext."""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from tests._single_file_ldm import vae_to_ldm
from tests.conftest import TINY
from tests.helpers import running_services
from tests.tiny_sd import save_tiny_model
from webui.api import create_api_app
from webui.engine.models import scan_models_dir
from webui.schemas import InvalidRequest, JobState
from webui.storage.infotext import request_fields_from_infotext

QUICK = {"prompt": "a red barn", "steps": 2, "seed": 3, "width": 64, "height": 64, "save_images": False}
FILE = "other-vae.safetensors"


def other_vae(model_dir):
    """The tiny model's VAE with other weights: what a VAE file brings."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return vae


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A models folder with the tiny model, and its VAE folder with the other VAE in A1111's (LDM) layout, in
    diffusers' layout, and a file that is no VAE; and a copy of the model with the other VAE as its own."""
    models = tmp_path_factory.mktemp("vae-models")
    save_tiny_model(models / TINY)
    (models / "tiny-two").symlink_to(models / TINY, target_is_directory=True)  # the same weights, another model
    vae = other_vae(models / TINY)
    (models / "VAE").mkdir()
    ldm = {key.removeprefix("first_stage_model."): value.contiguous() for key, value in vae_to_ldm(vae).items()}
    save_file(ldm, str(models / "VAE" / FILE))
    save_file({key: value.contiguous() for key, value in vae.state_dict().items()},
              str(models / "VAE" / "diffusers-layout.safetensors"))
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(4, 4)}, str(models / "VAE" / "not-a-vae.safetensors"))
    reference = tmp_path_factory.mktemp("reference-models")
    shutil.copytree(models / TINY, reference / TINY)
    shutil.rmtree(reference / TINY / "vae")
    vae.save_pretrained(reference / TINY / "vae")
    return models, reference


@pytest.fixture(scope="module")
def services(folders, tmp_path_factory):
    yield from running_services(folders[0], tmp_path_factory.mktemp("vae-out"))


def pixels(services, request: dict) -> np.ndarray:
    job = services.worker.submit(QUICK | request)
    assert job.wait(120) and job.state is JobState.DONE, job.error
    return np.asarray(job.images[0].image, np.int16)


def test_a_vae_file_draws_as_the_model_with_that_vae_would(services, folders, tmp_path):
    own, chosen = pixels(services, {"sd_vae": "None"}), pixels(services, {"sd_vae": FILE})
    started = running_services(folders[1], tmp_path / "out")  # the model whose own VAE is the file's
    try:
        expected = pixels(next(started), {})
    finally:
        started.close()
    assert np.abs(chosen - expected).max() <= 1 and np.abs(chosen - own).max() > 10
    assert np.array_equal(pixels(services, {"sd_vae": "diffusers-layout.safetensors"}), chosen)
    assert np.array_equal(pixels(services, {"sd_vae": "None"}), own)  # the model's own weights came back
    assert np.array_equal(pixels(services, {"sd_vae": "Automatic"}), own)  # no file named after the model


def test_automatic_takes_a_file_named_after_the_model(services, folders):
    named = folders[0] / "VAE" / f"{TINY}.vae.safetensors"
    shutil.copy(folders[0] / "VAE" / FILE, named)
    try:
        job = services.worker.submit(QUICK | {"sd_vae": "Automatic"})
        assert job.wait(120) and job.state is JobState.DONE, job.error
        assert np.array_equal(np.asarray(job.images[0].image, np.int16), pixels(services, {"sd_vae": FILE}))
        assert f"VAE: {TINY}.vae.safetensors" in job.images[0].infotext
    finally:
        named.unlink()


def test_the_infotext_names_the_vae_and_its_hash_as_a1111_and_a_paste_reads_it_back(services, folders):
    job = services.worker.submit(QUICK | {"sd_vae": FILE})
    assert job.wait(120) and job.state is JobState.DONE, job.error
    digest = hashlib.sha256((folders[0] / "VAE" / FILE).read_bytes()).hexdigest()[:10]
    assert f"VAE hash: {digest}, VAE: {FILE}" in job.images[0].infotext
    assert request_fields_from_infotext(job.images[0].infotext)["sd_vae"] == FILE
    own = services.worker.submit(QUICK | {"sd_vae": "None"})
    assert own.wait(120) and "VAE" not in own.images[0].infotext


def test_what_cannot_be_used_is_refused_and_the_worker_goes_on(services):
    with pytest.raises(InvalidRequest, match=r"no VAE 'missing.pt' in .*choose one of Automatic, None, "
                                             r"diffusers-layout.safetensors, not-a-vae.safetensors, other-vae"):
        services.worker.submit(QUICK | {"sd_vae": "missing.pt"})
    job = services.worker.submit(QUICK | {"sd_vae": "not-a-vae.safetensors"})
    assert job.wait(120) and job.state is JobState.FAILED and job.refused
    assert "not-a-vae.safetensors is not a VAE for this model" in job.error
    assert pixels(services, {"sd_vae": "None"}).shape == (64, 64, 3)


def test_the_models_list_leaves_the_vae_folder_and_the_vaes_beside_models_out(folders, tmp_path):
    assert [entry.name for entry in scan_models_dir(folders[0])] == [TINY, "tiny-two"]
    for name in ("m.safetensors", "m.vae.safetensors", "m.vae.pt", "m.VAE.ckpt"):
        (tmp_path / name).write_bytes(b"weights")
    assert [entry.name for entry in scan_models_dir(tmp_path)] == ["m"]


def test_the_vae_follows_a_model_switch_and_a_file_beside_the_model_is_automatics(services, folders):
    on_first = pixels(services, {"sd_vae": FILE, "model": TINY})
    assert np.array_equal(pixels(services, {"sd_vae": FILE, "model": "tiny-two"}), on_first)  # put in the new model
    own = pixels(services, {"sd_vae": "none", "model": "tiny-two"})  # "none": A1111 writes it in any case
    assert not np.array_equal(own, on_first)
    beside = folders[0] / "tiny-two.vae.safetensors"  # A1111's place for a model's own VAE file
    shutil.copy(folders[0] / "VAE" / FILE, beside)
    try:
        assert "tiny-two.vae.safetensors" in services.engine.vaes.choices()
        assert np.array_equal(pixels(services, {"sd_vae": "Automatic", "model": "tiny-two"}), on_first)
        assert np.array_equal(pixels(services, {"sd_vae": "Automatic", "model": TINY}), own)  # not TINY's
        assert np.array_equal(pixels(services, {"sd_vae": "tiny-two.vae.safetensors", "model": TINY}), on_first)
    finally:
        beside.unlink()
        services.worker.submit(QUICK | {"model": TINY}).wait(60)


def test_a_vae_file_saved_again_under_its_name_is_read_again(services, folders):
    from diffusers import AutoencoderKL

    swap = folders[0] / "VAE" / "sub" / "swap.safetensors"
    swap.parent.mkdir()
    try:
        shutil.copy(folders[0] / "VAE" / FILE, swap)
        assert np.array_equal(pixels(services, {"sd_vae": "sub/swap.safetensors"}), pixels(services, {"sd_vae": FILE}))
        own = AutoencoderKL.from_pretrained(folders[0] / TINY / "vae")
        save_file({k: v.contiguous() for k, v in own.state_dict().items()}, str(swap))
        os.utime(swap, ns=(swap.stat().st_atime_ns, swap.stat().st_mtime_ns + 10**9))
        assert np.array_equal(pixels(services, {"sd_vae": "swap.safetensors"}),  # its base name, as A1111's
                              pixels(services, {"sd_vae": "None"}))
    finally:
        shutil.rmtree(swap.parent)


def test_img2img_encodes_the_picture_with_the_chosen_vae_too(services):
    from tests.helpers import noise_picture

    runs = {}
    for vae in ("None", FILE):
        job = services.worker.submit(QUICK | {"sd_vae": vae, "denoising_strength": 0.3}, init_image=noise_picture(3))
        assert job.wait(120) and job.state is JobState.DONE, job.error
        runs[vae] = np.asarray(job.images[0].image, np.int16)
    assert np.abs(runs["None"] - runs[FILE]).max() > 10


def test_the_api_lists_the_vaes_and_takes_one_per_request_or_as_the_option(services, folders):
    with TestClient(create_api_app(services)) as client:
        listed = client.get("/sdapi/v1/sd-vae").json()
        assert [item["model_name"] for item in listed] == ["diffusers-layout.safetensors", "not-a-vae.safetensors",
                                                           FILE]
        body = QUICK | {"override_settings": {"sd_vae": FILE}}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        import json
        info = json.loads(r.json()["info"])
        assert info["sd_vae_name"] == FILE and len(info["sd_vae_hash"]) == 10
        assert client.post("/sdapi/v1/options", json={"sd_vae": "nope"}).status_code == 422
        # a file that is no VAE for the loaded model would fail every later request: refused when set (a probe)
        r = client.post("/sdapi/v1/options", json={"sd_vae": "not-a-vae.safetensors"})
        assert r.status_code == 422 and "sd_vae: not-a-vae.safetensors is not a VAE for this model" in r.json()["detail"]
        assert client.get("/sdapi/v1/options").json()["sd_vae"] != "not-a-vae.safetensors"
        assert client.post("/sdapi/v1/options", json={"sd_vae": FILE}).json()["applied"] == ["sd_vae"]
        assert client.get("/sdapi/v1/options").json()["sd_vae"] == FILE
        info = json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])
        assert info["sd_vae_name"] == FILE  # the option's, for a request that names none
        client.post("/sdapi/v1/options", json={"sd_vae": "none"})  # A1111 writes it in any case
        assert json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])["sd_vae_name"] is None
        # The option's file deleted since: the run goes on with Automatic and says so (every request failed)
        shutil.copy(folders[0] / "VAE" / FILE, folders[0] / "VAE" / "soon-gone.safetensors")
        assert client.post("/sdapi/v1/options", json={"sd_vae": "soon-gone.safetensors"}).status_code == 200
        (folders[0] / "VAE" / "soon-gone.safetensors").unlink()
        r = client.post("/sdapi/v1/txt2img", json=QUICK)
        assert r.status_code == 200, r.text[:300]
        assert any("the option's VAE 'soon-gone.safetensors' is no longer on this server; ran with Automatic" in w
                   for w in json.loads(r.json()["info"])["warnings"])
        own = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"sd_vae": "None"}})
        assert not any("soon-gone" in w for w in json.loads(own.json()["info"])["warnings"])  # it chose its own
        client.post("/sdapi/v1/options", json={"sd_vae": "none"})
        r = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"sd_vae": "missing.pt"}})
        assert r.status_code == 422 and "override_settings.sd_vae: there is no VAE 'missing.pt'" in r.json()["detail"]
        # An infotext's VAE is applied too (A1111 reads it as an override of the option).
        pasted = QUICK | {"infotext": f"a barn\nSteps: 2, Seed: 3, Size: 64x64, VAE: {FILE}"}
        assert json.loads(client.post("/sdapi/v1/txt2img", json=pasted).json()["info"])["sd_vae_name"] == FILE
        # One this server lacks is left out with a warning, as A1111 runs on without it: the option's runs
        r = client.post("/sdapi/v1/txt2img", json=pasted | {"infotext": pasted["infotext"] + "x"})
        assert r.status_code == 200, r.text[:300]
        info = json.loads(r.json()["info"])
        assert info["sd_vae_name"] is None and "VAE" not in info["infotexts"][0]
        assert any(f"its VAE '{FILE}x' is not on this server; ran with None" in w for w in info["warnings"])


def test_the_page_picks_the_vae_beside_the_checkpoint_and_a_sent_infotext_sets_it(services):
    from tests.test_ui import event
    from webui.ui.blocks import create_ui
    from webui.ui.generation import Session
    from webui.ui.params import TXT2IMG_FIELDS

    ui = create_ui(services)
    assert ui.picker.vae.choices[:3] == [("Automatic", "Automatic"), ("None", "None"),
                                         ("diffusers-layout.safetensors", "diffusers-layout.safetensors")]
    session = list(event(ui, "txt2img")(Session(), "a red barn", steps=2, width=64, height=64, seed=3, model=TINY,
                                        sd_vae=FILE))[-1][0]
    made = services.worker.get(session.job_id).images[0]
    assert f"VAE: {FILE}" in made.infotext
    values = event(ui, "send_from_pnginfo")(made.infotext)
    assert values[TXT2IMG_FIELDS.index("sd_vae")]["value"] == FILE
    gone = event(ui, "send_from_pnginfo")(made.infotext.replace(FILE, "gone.pt"))
    assert gone[TXT2IMG_FIELDS.index("sd_vae")] == event(ui, "send_from_pnginfo")("a cat")[
        TXT2IMG_FIELDS.index("sd_vae")]  # left as it was, as with no VAE named


def test_a_sent_vae_in_a_subfolder_is_found_by_its_base_name_where_one_file_has_it():
    """A1111 writes `VAE: vae.safetensors` for sd15/vae.safetensors; the page's list names it by its path (found by
    review: it was not applied)."""
    from webui.ui.params import TXT2IMG_FIELDS, widget_updates

    def sent(vae: str, names: list[str]):
        fields = {"prompt": "a cat", "sd_vae": vae}
        return dict(zip(TXT2IMG_FIELDS, widget_updates(fields, TXT2IMG_FIELDS, [], lambda *_: None, names)))["sd_vae"]

    names = ["Automatic", "None", "sd15/vae.safetensors", "other.pt"]
    assert sent("vae.safetensors", names)["value"] == "sd15/vae.safetensors"
    assert sent("vae", names)["value"] == "sd15/vae.safetensors"
    two = [*names, "sdxl/vae.safetensors"]  # two files of that name: which one is not known
    assert sent("vae.safetensors", two) == sent("gone.pt", two) == dict(zip(TXT2IMG_FIELDS, widget_updates(
        {"prompt": "a cat"}, TXT2IMG_FIELDS, [], lambda *_: None, two)))["sd_vae"]
