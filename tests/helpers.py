"""Small helpers shared by the test modules."""
from __future__ import annotations

import threading
import time

import numpy as np
from PIL import Image


def loaded_engine(models_dir, model: str, cache_dir=None, **settings):
    """An Engine on the CPU over `models_dir` with `model` loaded (its hash cache in cache_dir, else models_dir);
    settings: more Settings fields (lora_dir=..., embeddings_dir=...)."""
    from pathlib import Path

    from webui.config import Settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry

    engine = Engine(Settings(models_dir=models_dir, device="cpu", **settings),
                    ModelRegistry(models_dir, Path(cache_dir or models_dir) / "hashes.json"))
    engine.load(model)
    return engine


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> bool:
    """Poll until condition() is true; fail the test (not hang) when it never becomes true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def running_services(models_dir, outdir, **settings):
    """Services on the tiny test model, started; a generator for module-scoped fixtures."""
    from webui.config import Settings
    from webui.services import build_services

    defaults = {"ckpt": "tiny-sd", "device": "cpu"}
    services = build_services(Settings(models_dir=models_dir, outdir=outdir, **(defaults | settings)))
    try:
        yield services
    finally:
        services.close()


def noise_picture(seed: int, width: int = 64, height: int = 64) -> Image.Image:
    """A picture of random pixels: two seeds give two pictures."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def fingerprint(module) -> float:
    """A model part told apart by its weights: the sum of its first parameter."""
    return round(float(next(module.parameters()).double().sum()), 6)


def spy_on(monkeypatch, model_class, method: str, names: dict[float, str], seen: list, note=lambda name, *a, **k: name):
    """From now on every call of model_class.method appends note(the model's name, the call's arguments) to seen; the
    model is named by its fingerprint in `names` ("?" for one not there)."""
    original = getattr(model_class, method)

    def spy(self, *args, **kwargs):
        seen.append(note(names.get(fingerprint(self), "?"), *args, **kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(model_class, method, spy)


def finished_job(services, request, **kwargs):
    """A request submitted to the services' worker and waited for; the job, which must have finished well."""
    from webui.schemas import JobState

    job = services.worker.submit(request, **kwargs)
    assert job.wait(120) and job.state is JobState.DONE, job.error
    return job


def api_infotext(client, body: dict, **extra) -> str:
    """The first picture's infotext of a txt2img the API answered, the body with `extra` fields, which must run."""
    import json

    answer = client.post("/sdapi/v1/txt2img", json=body | extra)
    assert answer.status_code == 200, answer.text
    return json.loads(answer.json()["info"])["infotexts"][0]


def interrupted_api_training(client, services, route: str, body: dict) -> tuple[dict, object]:
    """A long training POSTed to `route` (steps 100000), /sdapi/v1/progress read once it has stepped, then the
    caller's /sdapi/v1/interrupt: the progress read, and the route's answer."""
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(client.post(route, json=body | {"steps": 100000})))
    waiting.start()
    wait_for(lambda: services.worker.training is not None and services.worker.training.status is not None,
             what="the API's training")
    progress = client.get("/sdapi/v1/progress").json()
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    waiting.join(60)
    [answer] = answers
    return progress, answer


def inpainting_model_engine(folder):
    """An Engine with the tiny model made for inpainting (a 9-channel UNet) loaded from `folder`, recording what its
    UNet reads in `unet_inputs`."""
    from tests.tiny_sd import save_tiny_model

    save_tiny_model(folder / "tiny-inpainting", in_channels=9)
    return recording_unet_inputs(loaded_engine(folder, "tiny-inpainting"))


def recording_unet_inputs(engine):
    """The engine, its UNet's inputs from now on in `engine.unet_inputs` (as the UNet reads them: after the run's own
    pre-hooks)."""
    engine.unet_inputs = []
    engine.pipe.unet.register_forward_hook(lambda _module, args, _out: engine.unet_inputs.append(args[0]))
    return engine


def reported_steps(monkeypatch) -> list[tuple]:
    """(latents, the sampler's estimate or None) of each step an engine run reports from now on, as they stood then
    (on_step itself is shown the estimate, for the live preview)."""
    from webui.engine.generate import _Run

    reported, real = [], _Run.step

    def step(run, number, latents, estimate=None):
        if run.on_step is not None and number > run.reported:  # PLMS calls its model twice for its first step
            reported.append((latents.clone(), None if estimate is None else estimate.clone()))
        return real(run, number, latents, estimate)

    monkeypatch.setattr(_Run, "step", step)
    return reported


def raising(error: BaseException):
    """A stand-in for a call that fails with `error` whatever it is given (a locked database, a full disk)."""
    def fail(*args, **kwargs):
        raise error
    return fail
