"""Compiling the model: when it is on, the warm-up in the background, the fall-back when compiling fails,
and the bound on compiled variants. torch.compile's "eager" backend stands in for inductor: it traces the
modules as inductor would, without minutes of C++ compilation on this CPU."""
from __future__ import annotations

import asyncio
import logging
import os
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import webui.engine.fast_path as fast_path
from webui.api import create_api_app
from webui.config import parse_settings
from webui.engine.fast_path import compile_choice, is_compiled
from webui.schemas import GenerationRequest, JobState
from webui.ui.progress import progress_html
from tests.conftest import TINY
from tests.helpers import running_services, wait_for

CUDA_DEFAULTS = dict(device="cuda", offloading=False, xformers=False, zerogpu=False)


@pytest.fixture
def compile_with(monkeypatch, fresh_dynamo):
    """Make the engine compile with a given torch.compile backend; records every apply_fast_path call."""
    calls = []
    real = fast_path.apply_fast_path

    def use(backend):
        monkeypatch.setattr(fast_path, "apply_fast_path", lambda pipe, compile: calls.append(compile)
                            or real(pipe, compile=compile, backend=backend))
        return calls

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(name, "")  # restored after the test; the loader only sets them when unset
        monkeypatch.delenv(name)
    return use


def warmed_up(services) -> None:
    """Return once the warm-up that load_model queued first in line has run."""
    services.worker.call(lambda engine: None).result(120)


def tiny_engine(models_dir, tmp_path, compile: bool):
    """An Engine with the tiny model loaded, compiled or not, on the CPU."""
    from webui.config import Settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry

    engine = Engine(Settings(models_dir=models_dir, outdir=tmp_path, device="cpu", compile=compile),
                    ModelRegistry(models_dir, tmp_path / "hashes.json"))
    engine.load(TINY)
    return engine


def pixels(results) -> np.ndarray:
    return np.stack([np.asarray(r.image, dtype=np.int16) for r in results])


# --- when to compile ------------------------------------------------------------------------------
def test_the_flags_decide_over_the_default():
    assert parse_settings([], {}).compile is None
    assert parse_settings(["--compile"], {}).compile is True
    assert parse_settings(["--no-compile"], {}).compile is False
    assert compile_choice(True, **CUDA_DEFAULTS | {"device": "cpu"})[0] is True
    assert compile_choice(False, **CUDA_DEFAULTS)[0] is False


def test_by_default_a_cuda_gpu_with_triton_compiles(monkeypatch):
    monkeypatch.setattr(fast_path, "_triton_works", lambda: True)
    assert compile_choice(None, **CUDA_DEFAULTS) == (True, "CUDA GPU with Triton")


@pytest.mark.parametrize("change, reason", [
    ({"device": "cpu"}, "only on a CUDA GPU"),
    ({"device": "mps"}, "only on a CUDA GPU"),
    ({"offloading": True}, "--medvram/--lowvram"),
    ({"xformers": True}, "--xformers"),
    ({"zerogpu": True}, "ZeroGPU"),
])
def test_by_default_unsafe_setups_stay_uncompiled(monkeypatch, change, reason):
    monkeypatch.setattr(fast_path, "_triton_works", lambda: True)
    monkeypatch.setattr(fast_path, "xformers_works", lambda: True)
    compile_now, why = compile_choice(None, **CUDA_DEFAULTS | change)
    assert compile_now is False and reason in why


def test_xformers_asked_for_but_not_installed_does_not_cost_the_compile(monkeypatch):
    monkeypatch.setattr(fast_path, "_triton_works", lambda: True)
    monkeypatch.setattr(fast_path, "xformers_works", lambda: False, raising=False)
    compile_now, why = compile_choice(None, **CUDA_DEFAULTS | {"xformers": True})
    assert compile_now is True and "--xformers ignored: xformers does not work with this torch" in why


def test_without_triton_a_cuda_gpu_stays_uncompiled(monkeypatch):
    monkeypatch.setattr(fast_path, "_triton_works", lambda: False)
    assert compile_choice(None, **CUDA_DEFAULTS)[0] is False


def test_the_compile_cache_goes_to_the_outputs_folder_unless_the_user_chose_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from webui.engine.fast_path import use_compile_cache

    # What importing torch._dynamo (diffusers does) leaves in the variable: torch's /tmp default.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    use_compile_cache(tmp_path / "outputs-cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "outputs-cache")
    assert (tmp_path / "outputs-cache").is_dir()

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "the-users-choice"))
    use_compile_cache(tmp_path / "outputs-cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "the-users-choice")


# --- warm-up on the worker ------------------------------------------------------------------------
def test_the_worker_warms_a_compiled_model_up_in_the_background(models_dir, tmp_path, compile_with, monkeypatch):
    """Start-up returns before the compile; queued jobs wait behind it and say why; API clients see it."""
    calls = compile_with("eager")
    release = threading.Event()
    from webui.engine.generate import Engine

    real_warm_up = Engine.warm_up
    shown = []  # what the worker said after each warm-up step

    def held_warm_up(engine, on_step=None):
        assert release.wait(60), "the test never released the warm-up"
        real_warm_up(engine, lambda *args: on_step(*args) or shown.append(services.worker.activity))

    monkeypatch.setattr(Engine, "warm_up", held_warm_up)
    services = next(gen := running_services(models_dir, tmp_path / "out", compile=True))
    try:
        worker, engine = services.worker, services.engine
        assert calls == [True] and is_compiled(engine.pipe)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "out" / "cache" / "torch-compile")
        wait_for(lambda: worker.activity == f"Compiling {TINY}", what="the warm-up to start")
        assert engine.needs_warm_up  # start-up returned while the compile had not run

        job = worker.submit({"prompt": "a red apple", "steps": 2, "seed": 1})
        assert job.state is JobState.QUEUED
        assert f"Compiling {TINY}" in progress_html(job, worker.position(job.id), worker.activity)
        with TestClient(create_api_app(services)) as client:
            reply = client.get("/sdapi/v1/progress").json()
        assert reply["textinfo"] == f"Compiling {TINY}" and reply["state"]["queued"] == 1

        release.set()
        assert job.wait(120) and job.state is JobState.DONE, job.error
        warmed_up(services)
        assert not engine.needs_warm_up and worker.activity is None
        assert is_compiled(engine.pipe)
        assert shown == [f"Compiling {TINY} for 64x64: warm-up step 1/3", f"Compiling {TINY} for 64x64: warm-up step 2/3",
                         f"Compiling {TINY} for 64x64: warm-up step 3/3, then the VAE decoder"]
        worker.load_model(TINY)  # the same model again: nothing left to compile
        assert not engine.needs_warm_up
    finally:
        release.set()
        gen.close()


def test_a_model_that_fails_to_compile_runs_uncompiled(models_dir, tmp_path, compile_with, caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("this compiler is broken")

    compile_with(broken_backend)
    with caplog.at_level(logging.WARNING, logger="webui.engine.generate"):
        for services in running_services(models_dir, tmp_path / "out", compile=True):
            warmed_up(services)  # the fall-back happens during the warm-up
            engine = services.engine
            assert not is_compiled(engine.pipe) and not engine.needs_warm_up
            job = services.worker.submit({"prompt": "a red apple", "steps": 2, "seed": 1})
            assert job.wait(120) and job.state is JobState.DONE, job.error
    assert "torch.compile failed (BackendCompilerFailed" in caplog.text and "uncompiled" in caplog.text


def test_compiled_variants_are_bounded_and_later_shapes_still_run(models_dir, tmp_path, compile_with, monkeypatch):
    """Past MAX_COMPILED_VARIANTS shapes the UNet runs uncompiled: the same pictures, no more compiles."""
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(fast_path, "MAX_COMPILED_VARIANTS", 2)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)
    compile_with(counting_backend)
    compiled, plain = tiny_engine(models_dir, tmp_path, True), tiny_engine(models_dir, tmp_path, False)
    for width in (64, 72, 80, 88):  # four sizes: two compiled variants, then two uncompiled runs
        request = GenerationRequest(prompt="a red apple", steps=2, width=width, height=64)
        ours, theirs = pixels(compiled.generate(request, [3])), pixels(plain.generate(request, [3]))
        assert np.abs(ours - theirs).max() <= 1, width
    # One graph for the UNet and one for the VAE decoder per compiled size (the tiny model has no graph
    # breaks), for the first two sizes only.
    assert len(compiles) == 2 * 2


def test_the_model_picker_shows_the_compile_until_it_is_done(models_dir, tmp_path, compile_with, monkeypatch):
    from webui.engine.generate import Engine
    from webui.ui.models import ModelActions

    compile_with("eager")
    own_models = tmp_path / "models"
    own_models.mkdir()
    for name in ("tiny-a", "tiny-b"):
        (own_models / name).symlink_to(models_dir / TINY, target_is_directory=True)
    release = threading.Event()
    real_warm_up = Engine.warm_up
    monkeypatch.setattr(Engine, "warm_up", lambda engine, on_step=None: release.wait(60)
                        and real_warm_up(engine, on_step))
    monkeypatch.setattr("webui.ui.models.WARM_UP_POLL_SECONDS", 0.01)
    release.set()  # the start-up model compiles at once
    for services in running_services(own_models, tmp_path / "out", ckpt="tiny-a", compile=True):
        warmed_up(services)
        release.clear()
        actions = ModelActions(services)

        async def watch_the_load():  # the picker's handler is async: Gradio runs it on its event loop
            updates = actions.load("tiny-b")
            assert "Loading tiny-b" in (await anext(updates))[0]
            loaded_status = (await anext(updates))[0]
            assert "tiny-b" in loaded_status and "compiling; images wait" in loaded_status
            wait_for(lambda: services.worker.activity == "Compiling tiny-b", what="the warm-up to start")
            assert "Compiling tiny-b" in (await anext(updates))[0]  # polled while the warm-up is held
            release.set()
            return [update async for update in updates][-1][0]

        final_status = asyncio.run(watch_the_load())
        assert "tiny-b" in final_status and "compiling" not in final_status
        assert not services.engine.needs_warm_up


def test_the_model_put_back_after_an_override_job_is_warmed_up(models_dir, tmp_path, compile_with):
    """An API job with override_settings loads another model, then the old one again; that reload is
    compiled too, so it is warmed up like any load (else the page says 'compiling' until the next image)."""
    compile_with("eager")
    own_models = tmp_path / "models"
    own_models.mkdir()
    for name in ("tiny-a", "tiny-b"):
        (own_models / name).symlink_to(models_dir / TINY, target_is_directory=True)
    for services in running_services(own_models, tmp_path / "out", ckpt="tiny-a", compile=True):
        warmed_up(services)
        job = services.worker.submit({"prompt": "x", "steps": 1, "model": "tiny-b", "restore_model": True})
        assert job.wait(120) and job.state is JobState.DONE, job.error
        warmed_up(services)
        assert services.engine.model.entry.name == "tiny-a" and not services.engine.needs_warm_up


def test_a_job_queued_during_a_load_waits_for_the_warm_up(models_dir, tmp_path, compile_with, monkeypatch):
    """The warm-up goes first in line, so the user who pressed Generate while the model loaded does
    not pay the compile; a model loaded by a job itself is warm once that job has run."""
    from webui.engine.generate import Engine

    compile_with("eager")
    own_models = tmp_path / "models"
    own_models.mkdir()
    for name in ("tiny-a", "tiny-b"):
        (own_models / name).symlink_to(models_dir / TINY, target_is_directory=True)
    loading, release, events = threading.Event(), threading.Event(), []
    real_load, real_warm_up = Engine.load, Engine.warm_up

    def held_load(engine, name):
        if name == "tiny-b":
            loading.set()
            assert release.wait(60), "the test never released the load"
        return real_load(engine, name)

    def recorded_warm_up(engine, on_step=None):
        real_warm_up(engine, on_step)
        events.append(f"{engine.model.entry.name} warmed up")

    monkeypatch.setattr(Engine, "load", held_load)
    monkeypatch.setattr(Engine, "warm_up", recorded_warm_up)
    for services in running_services(own_models, tmp_path / "out", ckpt="tiny-a", compile=True):
        worker = services.worker
        warmed_up(services)
        loader = threading.Thread(target=worker.load_model, args=("tiny-b",))
        loader.start()
        assert loading.wait(60)
        job = worker.submit({"prompt": "a red apple", "steps": 2, "seed": 1})  # while tiny-b loads
        real_generate = services.engine.generate
        monkeypatch.setattr(services.engine, "generate",
                            lambda *args: events.append("an image") or real_generate(*args))
        release.set()
        loader.join(60)
        assert job.wait(120) and job.state is JobState.DONE, job.error
        # The warm-up's image, then the job's: had the job gone first, it would have compiled tiny-b.
        assert events == ["tiny-a warmed up", "an image", "tiny-b warmed up", "an image"]

        # A job that asks for another model loads it itself (no warm-up queued) and compiles while it runs.
        job = worker.submit({"prompt": "a red apple", "steps": 2, "seed": 1, "model": "tiny-a"})
        assert job.wait(120) and job.state is JobState.DONE, job.error
        assert services.engine.model.entry.name == "tiny-a" and not services.engine.needs_warm_up


def warmed_engine_counting_graphs(models_dir, tmp_path, compile_with) -> tuple:
    """A compiled, warmed-up tiny engine, and the list of graphs torch compiles from then on."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_with(counting_backend)
    engine = tiny_engine(models_dir, tmp_path, compile=True)
    engine.warm_up()
    return engine, graphs


def test_the_engine_predicts_which_parts_compile(models_dir, tmp_path, compile_with):
    """pending_compiles against what torch really compiles: one graph per part on the tiny model."""
    engine, graphs = warmed_engine_counting_graphs(models_dir, tmp_path, compile_with)
    long_prompt = " ".join(["apple"] * 100)  # two 75-token chunks
    cases = [  # (what changes, seeds, the parts expected to compile)
        ({}, [1], []),
        ({"sampler_name": "Euler"}, [1], []),  # float timesteps, as the warm-up's sampler
        ({"sampler_name": "DPM++ 2M"}, [1], ["UNet"]),  # integer timesteps
        ({"width": 96}, [1], ["UNet", "VAE decoder"]),
        ({"prompt": long_prompt}, [1], ["UNet"]),
        ({"cfg_scale": 1}, [1], ["UNet"]),  # no CFG: half the UNet batch
        ({}, [1, 2], ["UNet", "VAE decoder"]),
        ({"width": 96}, [1], []),  # seen above
    ]
    for change, seeds, expected in cases:
        request = GenerationRequest(**{"prompt": "a red apple", "steps": 2} | change)
        assert engine.pending_compiles(request, len(seeds)) == expected, change
        before = len(graphs)
        engine.generate(request, seeds)
        assert len(graphs) - before == len(expected), change  # the prediction matches torch


def test_prompt_editing_between_two_lengths_compiles_the_unet_at_both(models_dir, tmp_path, compile_with):
    """Each phase runs the UNet at its own prompt length: both are predicted, compiled and then known."""
    engine, graphs = warmed_engine_counting_graphs(models_dir, tmp_path, compile_with)
    two_chunks, three_chunks = " ".join(["cat"] * 100), " ".join(["cat"] * 200)
    edited = GenerationRequest(prompt=f"[{two_chunks}:{three_chunks}:1]", steps=3)
    assert engine.pending_compiles(edited, 1) == ["UNet"]
    before = len(graphs)
    engine.generate(edited, [1])
    assert len(graphs) - before == 2  # one UNet graph for each length
    for text in (two_chunks, three_chunks):
        assert engine.pending_compiles(GenerationRequest(prompt=text, steps=3), 1) == []


def test_a_composed_prompt_runs_the_compiled_model_eagerly_and_compiles_nothing(models_dir, tmp_path, compile_with):
    """AND runs a row per part (another batch shape) through hooks a graph would bake in: it runs uncompiled,
    predicts no compile, and the next plain run still finds its graphs."""
    engine, graphs = warmed_engine_counting_graphs(models_dir, tmp_path, compile_with)
    composed = GenerationRequest(prompt="a red apple AND a green pear:0.5", steps=2)
    assert engine.pending_compiles(composed, 1) == []
    before = len(graphs)
    engine.generate(composed, [1])
    assert len(graphs) == before
    plain = GenerationRequest(prompt="a red apple", steps=2)
    assert engine.pending_compiles(plain, 1) == []
    engine.generate(plain, [1])
    assert len(graphs) == before
    # At a new size the decoder still compiles, and so does a plain first pass before a composed hires pass.
    wide = composed.model_copy(update={"width": 96})
    assert engine.pending_compiles(wide, 1) == ["VAE decoder"]
    engine.generate(wide, [1])
    assert len(graphs) == before + 1 and engine.pending_compiles(wide, 1) == []
    hires = GenerationRequest(prompt="a red apple", steps=2, width=80, enable_hr=True, hr_scale=1.2,
                              hr_prompt="a red apple AND a pear", denoising_strength=0.5)
    assert engine.pending_compiles(hires, 1) == ["UNet", "VAE decoder"]
    engine.generate(hires, [1])
    assert len(graphs) == before + 3 and engine.pending_compiles(hires, 1) == []


def test_hypernetworks_run_the_compiled_model_eagerly_and_compile_nothing(models_dir, tmp_path, compile_with):
    """Their hooks on the attention's key and value projections are not in a graph compiled without them (nor may a
    graph keep them): the pass runs uncompiled, with them, and predicts no compile."""
    from tests.test_hypernetworks import relu_file, write
    from webui.engine.hypernetworks import HypernetworkLibrary

    write(tmp_path / "hypernetworks", "bend", relu_file())
    engine, graphs = warmed_engine_counting_graphs(models_dir, tmp_path, compile_with)
    engine.hypernetworks = HypernetworkLibrary(tmp_path / "hypernetworks")
    bent = GenerationRequest(prompt="a red apple <hypernet:bend>", steps=2, width=80)  # a size not compiled yet
    assert engine.pending_compiles(bent, 1) == ["VAE decoder"]
    before = len(graphs)
    compiled = pixels(engine.generate(bent, [1]))
    assert len(graphs) == before + 1  # the decoder's graph alone
    assert np.abs(compiled - pixels(engine.generate(bent.model_copy(update={"prompt": "a red apple"}), [1]))).max() > 10
    eager = tiny_engine(models_dir, tmp_path, compile=False)
    eager.hypernetworks = engine.hypernetworks
    assert np.abs(compiled - pixels(eager.generate(bent, [1]))).max() <= 1  # the fast path's SDPA rounds apart


def test_a_pass_that_skips_the_negative_prompt_runs_eagerly_and_compiles_nothing(models_dir, tmp_path, compile_with):
    """Skip Early CFG and NGMS run some calls on half the batch: uncompiled, predicting no UNet compile."""
    engine, graphs = warmed_engine_counting_graphs(models_dir, tmp_path, compile_with)
    skipping = GenerationRequest(prompt="a red apple", steps=2, width=80, skip_early_cond=0.5)  # a new size
    assert engine.pending_compiles(skipping, 1) == ["VAE decoder"]
    before = len(graphs)
    engine.generate(skipping, [1])
    assert len(graphs) == before + 1  # the decoder's graph alone


def test_skip_options_that_skip_no_call_run_compiled_as_predicted(models_dir, tmp_path, compile_with):
    """NGMS below every noise level of the pass leaves every call guided: the compiled model runs, and the
    prediction says it compiles at a new size."""
    engine, graphs = warmed_engine_counting_graphs(models_dir, tmp_path, compile_with)
    never = GenerationRequest(prompt="a red apple", steps=2, width=80, s_min_uncond=0.01)  # sigmas end near 0.03
    assert engine.pending_compiles(never, 1) == ["UNet", "VAE decoder"]
    before = len(graphs)
    engine.generate(never, [1])
    assert len(graphs) == before + 2


def test_token_merging_runs_the_compiled_model_eagerly_and_compiles_nothing(models_dir, tmp_path, compile_with):
    """Its hooks on the attention layers would be baked into a graph: a pass with a ratio runs uncompiled, predicts no
    compile, and one without still finds its graphs (a hires pass merges at its own ratio)."""
    engine, graphs = warmed_engine_counting_graphs(models_dir, tmp_path, compile_with)
    merged = GenerationRequest(prompt="a red apple", steps=2, width=72, token_merging_ratio=0.5)
    assert engine.pending_compiles(merged, 1) == ["VAE decoder"]  # at a new size: the decoder alone
    before = len(graphs)
    engine.generate(merged, [1])
    assert len(graphs) == before + 1 and engine.pending_compiles(merged, 1) == []
    assert engine.pending_compiles(merged.model_copy(update={"token_merging_ratio": 0}), 1) == ["UNet"]
    hires = GenerationRequest(prompt="a red apple", steps=2, width=80, enable_hr=True, hr_scale=1.2,
                              denoising_strength=0.5, token_merging_ratio_hr=0.5)
    assert engine.pending_compiles(hires, 1) == ["UNet", "VAE decoder"]  # the first pass at 80 wide, unmerged
    engine.generate(hires, [1])
    assert len(graphs) == before + 3 and engine.pending_compiles(hires, 1) == []


def test_a_job_at_a_new_size_says_it_is_compiling(models_dir, tmp_path, compile_with, monkeypatch):
    compile_with("eager")
    first_step = threading.Event()
    for services in running_services(models_dir, tmp_path / "out", compile=True):
        worker, engine = services.worker, services.engine
        warmed_up(services)
        wide = GenerationRequest(prompt="a red apple", steps=2, width=96, height=64)
        real_generate = engine.generate
        monkeypatch.setattr(engine, "generate", lambda *args: first_step.wait(60) and real_generate(*args))
        # an API job of the test client's, which /api/v1/jobs shows to its owner only
        job = worker.submit(wide.model_dump(), origin="api", owner="address testclient")
        wait_for(lambda: job.progress.note, what="the job to say it compiles")
        note = "Compiling the UNet and the VAE decoder for 96x64"
        assert note in progress_html(job, None)
        with TestClient(create_api_app(services)) as client:
            assert note in client.get("/sdapi/v1/progress").json()["textinfo"]
            assert note in client.get(f"/api/v1/jobs/{job.id}").json()["progress"]["note"]
        first_step.set()
        assert job.wait(120) and job.state is JobState.DONE, job.error
        assert job.progress.note is None

        # Interrupted while it waits for the compile: the note goes with it.
        first_step.clear()
        job = worker.submit(wide.model_dump() | {"width": 128})
        wait_for(lambda: job.progress.note, what="the job to say it compiles")
        worker.cancel(job.id)
        first_step.set()
        assert job.wait(120) and job.state is JobState.CANCELLED
        assert job.progress.note is None


def reused_output_buffers(graph_module, example_inputs):
    """A backend that stands in for CUDA graphs on the CPU: every call of a graph writes its outputs into
    the same tensors, so an output kept past the next call changes under its holder."""
    buffers = []

    def run(*args):
        outputs = graph_module.forward(*args)
        if not buffers:
            buffers.extend(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)
        for buffer, output in zip(buffers, outputs):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(output)
        return type(outputs)(buffers)

    return run


def test_a_sampler_that_keeps_past_model_outputs_gives_the_eager_picture(models_dir, tmp_path, compile_with):
    """PLMS keeps its last UNet outputs, which without CFG are what the compiled UNet returned; with CUDA
    graphs those buffers are rewritten by the next step unless the fast path hands out copies."""
    compile_with(reused_output_buffers)
    request = GenerationRequest(prompt="a red apple", steps=5, sampler_name="PLMS", cfg_scale=1)
    compiled = pixels(tiny_engine(models_dir, tmp_path, compile=True).generate(request, [4]))
    plain = pixels(tiny_engine(models_dir, tmp_path, compile=False).generate(request, [4]))
    assert np.abs(compiled - plain).max() <= 1


def test_tiles_and_previews_decode_uncompiled(models_dir, tmp_path, compile_with):
    """VAE tiles (above a megapixel) and the first-image preview vary in shape: each would compile another
    decoder variant, and the tiles would share one output buffer. They run eagerly instead."""
    graphs = []

    def counting_reused_buffers(graph_module, example_inputs):
        graphs.append(graph_module)
        return reused_output_buffers(graph_module, example_inputs)

    compile_with(counting_reused_buffers)
    engine, plain = tiny_engine(models_dir, tmp_path, compile=True), tiny_engine(models_dir, tmp_path, compile=False)
    big = GenerationRequest(prompt="a red apple", steps=2, width=1032, height=1024)
    assert engine.pending_compiles(big, 1) == ["UNet"]  # no decoder compile to announce

    latents = torch.randn(2, 4, 80, 72, generator=torch.Generator().manual_seed(0))  # 3x3 tiles of 32, overlapping
    with torch.inference_mode():
        tiled = engine.decode(latents, tiled=True)
        expected = plain.decode(latents, tiled=True)
        preview = np.asarray(engine.preview(latents), dtype=np.int16)
        assert graphs == []
        assert torch.allclose(tiled, expected, atol=1e-4)
        assert np.abs(preview - np.asarray(plain.preview(latents), dtype=np.int16)).max() <= 1
        engine.decode(latents)  # the whole batch in one piece: compiled
    assert len(graphs) == 1


@pytest.mark.parametrize("package", [
    {"__init__.py": "raise ImportError('built for another torch')"},
    # imports, having warned that its C++/CUDA extensions cannot load (a wheel for another torch)
    {"__init__.py": "_has_cpp_library = False", "ops.py": "def memory_efficient_attention(*a): raise NotImplementedError"},
], ids=["fails to import", "imports without its extensions"])
def test_an_xformers_that_does_not_work_here_counts_as_missing(monkeypatch, tmp_path, package):
    import sys

    broken = tmp_path / "xformers"
    broken.mkdir()
    for name, text in package.items():
        (broken / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    fast_path.xformers_works.cache_clear()
    try:
        assert fast_path.xformers_works() is False
    finally:
        fast_path.xformers_works.cache_clear()
        for name in [n for n in sys.modules if n.startswith("xformers")]:
            sys.modules.pop(name)
