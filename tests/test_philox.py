"""A1111's Random number generator source "NV" (webui/engine/philox.py): an NVIDIA card's torch.randn drawn on the CPU,
so A1111's GPU seeds start from the same noise here; the runs, the Settings, the infotext's RNG key and its paste."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import finished_job, loaded_engine
from tests.tiny_sd import save_tiny_model
from webui.engine.noise import start_noise
from webui.engine.philox import PhiloxGenerator, make_generator
from webui.schemas import GenerationRequest, parse_request
from webui.storage.infotext import request_fields_from_infotext

# torch.manual_seed(0); torch.randn(3, 4, device="cuda"), as an NVIDIA card prints it (quoted in A1111's
# rng_philox.py as what its NV source must give)
CUDA_SEED_0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
               [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
               [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
# What A1111's own NV generator (modules/rng_philox.py, run apart from this project) gives: the second draw of a seed
# past 32 bits, and a first draw
A1111_NV = {(2**32 + 7, 1): [[-2.0203695, 0.6510461, -1.4301461], [1.0568589, -0.0266573, 0.50164753]],
            (1234567890, 0): [[0.23617812, 1.2633902, -0.54222375, -0.6837679, 1.5004278, 1.477517]]}


def test_the_first_draw_is_what_an_nvidia_card_draws():
    assert torch.allclose(PhiloxGenerator(0).randn((3, 4)), torch.tensor(CUDA_SEED_0), atol=1e-6)


@pytest.mark.parametrize("seed, draw", list(A1111_NV))
def test_every_draw_is_a1111s_nv_sources(seed, draw):
    expected = torch.tensor(A1111_NV[seed, draw])
    generator = PhiloxGenerator(seed)
    for _ in range(draw):
        generator.randn(expected.shape)
    assert torch.allclose(generator.randn(expected.shape), expected, atol=1e-6)  # as printed, to 8 digits


def test_the_state_saves_and_restores_the_draw_as_a_torch_generators_does():
    generator = PhiloxGenerator(9)
    state = generator.get_state()
    first = generator.randn((2, 2))
    assert not torch.equal(generator.randn((2, 2)), first)  # the next draw moves on
    generator.set_state(state)
    assert torch.equal(generator.randn((2, 2)), first) and generator.initial_seed() == 9


def test_the_start_noise_is_each_seeds_first_draw_and_a_variation_seeds_own_first_draw():
    shape = (4, 8, 8)
    noise = start_noise([make_generator("NV", seed) for seed in (3, 4)], shape, torch.float32, source="NV")
    assert torch.equal(noise[1:], PhiloxGenerator(4).randn((1, *shape)))
    varied = start_noise([make_generator("NV", 3)], shape, torch.float32, [11], 1.0, source="NV")
    assert torch.allclose(varied, PhiloxGenerator(11).randn((1, *shape)), atol=1e-5)  # strength 1: the subseed's


# --- runs ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    save_tiny_model(folder / "tiny-sd")
    return loaded_engine(folder, "tiny-sd")


def draw(engine, seeds=(5,), **fields) -> list[np.ndarray]:
    request = GenerationRequest(**{"prompt": "a red apple", "steps": 3, "width": 64, "height": 64} | fields)
    return [np.asarray(result.image, np.int16) for result in engine.generate(request, list(seeds))]


def test_a_run_starts_from_the_nv_noise_and_reproduces(engine, monkeypatch):
    started = []
    original = engine.pipe.unet.forward

    def first_input(sample, *args, **kwargs):
        started.append(sample[:1].clone())
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(engine.pipe.unet, "forward", first_input)
    nv = draw(engine, randn_source="NV", sampler_name="Euler")
    scale = float(engine.pipe.scheduler.init_noise_sigma) / (float(engine.pipe.scheduler.sigmas[0]) ** 2 + 1) ** 0.5
    expected = PhiloxGenerator(5).randn((1, 4, 32, 32)) * scale  # the UNet reads the scaled start noise
    assert torch.allclose(started[0], expected, atol=1e-4)
    monkeypatch.undo()
    assert (draw(engine, randn_source="NV", sampler_name="Euler")[0] == nv[0]).all()
    assert (draw(engine, sampler_name="Euler")[0] != nv[0]).any()  # the CPU source: other noise


@pytest.mark.parametrize("fields", [{"sampler_name": "Euler a"}, {"sampler_name": "Euler a", "eta_ancestral": 0.5},
                                    {"sampler_name": "DDIM", "eta_ddim": 0.7}, {"sampler_name": "DPM2 a"},
                                    {"sampler_name": "DPM++ 2S a"}, {"sampler_name": "Restart", "steps": 36}])
def test_a_sampler_that_draws_noise_as_it_steps_draws_it_from_the_images_nv_generators(engine, monkeypatch, fields):
    calls = []
    randn = PhiloxGenerator.randn
    monkeypatch.setattr(PhiloxGenerator, "randn", lambda self, *a, **k: calls.append(self.seed) or randn(self, *a, **k))
    [one, two] = draw(engine, (5, 6), randn_source="NV", **fields)
    assert calls.count(5) == calls.count(6) >= 3  # the start noise, then every step's but the last (Restart: two)
    monkeypatch.undo()
    assert (draw(engine, (6,), randn_source="NV", **fields)[0] - two).__abs__().max() <= 1  # as a single run
    assert (draw(engine, (5,), randn_source="NV", eta_noise_seed_delta=31337, **fields)[0] != one).any()


# --- the request, the Settings, the infotext --------------------------------------------------------------------------

def test_a1111s_gpu_source_is_read_as_nv_and_an_unknown_one_is_refused():
    assert parse_request({"randn_source": "GPU"}).randn_source == "NV"
    assert parse_request({"randn_source": "cpu"}).randn_source == "CPU"
    with pytest.raises(Exception, match="randn_source"):
        parse_request({"randn_source": "TPU"})


def test_the_infotext_says_which_source_and_an_a1111_infotext_without_one_was_its_gpus():
    ours = "x\nSteps: 2, Seed: 1, Version: diffusers-webui 0.1.0"
    assert request_fields_from_infotext(ours)["randn_source"] == "CPU"  # ours before the key was written
    assert request_fields_from_infotext("x\nSteps: 2, Seed: 1, Sampler: Euler")["randn_source"] == "NV"
    assert request_fields_from_infotext("x\nSteps: 2, Seed: 1, RNG: CPU")["randn_source"] == "CPU"
    assert request_fields_from_infotext(ours + ", RNG: NV")["randn_source"] == "NV"


def test_the_settings_override_settings_and_a_pasted_infotext_choose_the_source(services):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 3}

    def infotext(answer):
        assert answer.status_code == 200, answer.text
        return json.loads(answer.json()["info"])["infotexts"][0]

    job = finished_job(services, body)
    assert "RNG: CPU" in job.images[0].infotext  # written always: A1111 reads a missing key as its GPU source
    services.options.update({"randn_source": "GPU"})
    try:
        assert services.options.current().randn_source == "NV"
        assert "RNG: NV" in finished_job(services, body).images[0].infotext
    finally:
        services.options.update({"randn_source": "CPU"})
    with TestClient(create_api_app(services)) as client:
        overridden = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"randn_source": "NV"}})
        a1111 = client.post("/sdapi/v1/txt2img", json=body | {"infotext": "x\nSteps: 2, Seed: 3, Size: 64x64"})
        refused = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"randn_source": "TPU"}})
    assert "RNG: NV" in infotext(overridden) and "RNG: NV" in infotext(a1111)
    assert overridden.json()["images"] == a1111.json()["images"]
    assert refused.status_code == 422 and "override_settings.randn_source" in refused.text
