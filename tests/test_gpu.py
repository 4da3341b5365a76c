"""The fast path on a CUDA GPU, as `python app.py` runs it there: fp16, inductor, CUDA graphs. What the CPU
tests cannot show: that CUDA graphs' reused output buffers, the compiled decoder and the samplers work
together, and that the denoising loop never waits for the GPU. Skipped without a GPU; a lent one runs
them through bench/device_check.sh."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.gpu_speed import loop_sync_sites
from tests.conftest import TINY
from webui.schemas import GenerationRequest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def engines(models_dir, tmp_path_factory):
    """The tiny model compiled (the default on a GPU) and uncompiled, side by side."""
    from webui.config import Settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry

    folder = tmp_path_factory.mktemp("gpu")

    def engine(compile: bool) -> Engine:
        settings = Settings(models_dir=models_dir, outdir=folder, device="cuda", compile=compile)
        loaded = Engine(settings, ModelRegistry(models_dir, folder / "hashes.json"))
        loaded.load(TINY)
        return loaded

    return engine(True), engine(False)


def assert_same_pictures(ours, theirs) -> None:
    """Equal up to fp16 rounding, which compiled kernels order differently."""
    diff = np.abs(np.stack([np.asarray(r.image, dtype=np.int16) for r in ours])
                  - np.stack([np.asarray(r.image, dtype=np.int16) for r in theirs]))
    assert diff.mean() <= 1 and diff.max() <= 16, (diff.mean(), diff.max())


@pytest.mark.parametrize("sampler, cfg", [("Euler", 7), ("Euler a", 7), ("Heun", 7), ("DPM++ 2M", 7), ("PLMS", 1)])
def test_the_compiled_model_gives_the_uncompiled_picture(engines, sampler, cfg):
    """Each sampler family, with a preview at every step as when someone watches. PLMS without CFG keeps
    past UNet outputs, which CUDA graphs overwrite unless the fast path copies them."""
    from webui.engine.fast_path import is_compiled

    compiled, plain = engines
    request = GenerationRequest(prompt="a red apple", steps=6, sampler_name=sampler, cfg_scale=cfg)
    ours = compiled.generate(request, [7, 8], lambda step, total, latents: latents is not None and compiled.preview(latents))
    assert is_compiled(compiled.pipe), "the compile failed and the engine fell back to eager"
    assert_same_pictures(ours, plain.generate(request, [7, 8]))


def test_tiles_decode_under_cuda_graphs(engines):
    compiled, plain = engines
    latents = torch.randn(2, 4, 80, 72, generator=torch.Generator().manual_seed(0)).to("cuda", torch.float16)
    with torch.inference_mode():
        assert torch.allclose(compiled.decode(latents, tiled=True), plain.decode(latents, tiled=True), atol=2e-2)


def test_the_denoising_loop_never_waits_for_the_gpu(engines):
    """No host-device synchronisation after the first step (Euler draws no noise; its sigmas stay on the
    CPU). The first step may sync: the scheduler finds its place in the schedule."""
    compiled, _ = engines
    request = GenerationRequest(prompt="a red apple", steps=6, sampler_name="Euler")
    assert loop_sync_sites(compiled, request, [3]) == []


@pytest.mark.parametrize("prompt, steps", [("[a red apple:a green pear:3]", 6), ("[apple|pear] on a table", 6),
                                           ("a red apple", 1)])
def test_prompt_editing_and_one_step_under_cuda_graphs(engines, prompt, steps):
    """Prompt editing swaps the text embeddings inside the loop, into the inputs of a graph-captured UNet;
    one step is the shortest schedule the samplers' trailing spacing must handle."""
    compiled, plain = engines
    request = GenerationRequest(prompt=prompt, steps=steps, sampler_name="Euler a")
    assert_same_pictures(compiled.generate(request, [5, 6]), plain.generate(request, [5, 6]))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_img2img_under_cuda_graphs_in_fp16(engines, sampler):
    """img2img's pipeline shares the compiled UNet and decoder; the VAE encoder runs uncompiled in fp16."""
    from PIL import Image

    from webui.engine.img2img import image_sha1

    compiled, plain = engines
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    request = GenerationRequest(prompt="a red apple", steps=6, sampler_name=sampler, denoising_strength=0.5,
                                init_image=image_sha1(picture), width=64, height=64)
    ours = compiled.generate(request, [3, 4], init_image=picture)
    assert_same_pictures(ours, plain.generate(request, [3, 4], init_image=picture))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM2"])
def test_inpainting_under_cuda_graphs_in_fp16(engines, sampler):
    """Inpainting hands the pipeline new latents after every step (the kept part put back); DPM2 skips it half-way
    through its steps. The part outside the mask is the picture's own on both engines."""
    from PIL import Image

    from webui.engine.img2img import image_sha1
    from webui.engine.inpaint import prepare_inpainting, read_mask

    compiled, plain = engines
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    request = GenerationRequest(prompt="a red apple", steps=6, sampler_name=sampler, denoising_strength=0.6,
                                mask_blur=0)
    width, height, start, inpainting = prepare_inpainting(picture, read_mask(mask, picture.size), request)
    request = request.model_copy(update={"init_image": image_sha1(picture), "mask": image_sha1(mask),
                                         "width": width, "height": height})
    ours = compiled.generate(request, [3, 4], init_image=start, inpainting=inpainting)
    assert_same_pictures(ours, plain.generate(request, [3, 4], init_image=start, inpainting=inpainting))
    assert (np.asarray(ours[0].image)[:, 32:] == np.asarray(picture)[:, 32:]).all()


def test_variation_seeds_under_cuda_graphs(engines):
    """Variation seeds hand the pipeline its starting latents (slerp of two noises) instead of a seed."""
    compiled, plain = engines
    request = GenerationRequest(prompt="a red apple", steps=4, sampler_name="Euler", subseed_strength=0.4)
    ours = compiled.generate(request, [9, 9], subseeds=[10, 11])
    assert_same_pictures(ours, plain.generate(request, [9, 9], subseeds=[10, 11]))
    pixels = [np.asarray(r.image, dtype=np.int16) for r in ours]
    assert np.abs(pixels[0] - pixels[1]).max() > 0, "two variation seeds gave the same picture"


def test_a_lora_merged_into_a_graph_captured_unet_is_used_and_taken_out(engines, tmp_path):
    """The LoRA changes the weights in place; CUDA graphs read them from the same addresses at each replay, so
    the compiled model must give the uncompiled picture with the LoRA, and its own picture again after."""
    from tests.test_lora import kohya_state, lora_pairs, write_lora
    from webui.engine.lora import LoraLibrary

    write_lora(tmp_path, "detail", kohya_state(lora_pairs()))
    compiled, plain = engines
    compiled.loras = plain.loras = LoraLibrary(tmp_path)
    before = compiled.generate(GenerationRequest(prompt="a red apple", steps=4), [2])
    request = GenerationRequest(prompt="a red apple <lora:detail:0.8>", steps=4)
    ours = compiled.generate(request, [2])
    assert_same_pictures(ours, plain.generate(request, [2]))
    assert np.abs(np.asarray(ours[0].image, dtype=np.int16) - np.asarray(before[0].image, dtype=np.int16)).mean() > 2
    assert_same_pictures(compiled.generate(GenerationRequest(prompt="a red apple", steps=4), [2]), before)


def test_a_tiled_run_on_a_compiled_model_runs_eagerly_and_the_next_plain_one_is_compiled_again(engines):
    """Tiling changes every convolution's padding, which the compiled graphs were traced without."""
    from webui.engine.fast_path import is_compiled

    compiled, plain = engines
    tiled = GenerationRequest(prompt="a brick wall", steps=4, tiling=True)
    assert_same_pictures(compiled.generate(tiled, [5]), plain.generate(tiled, [5]))
    request = GenerationRequest(prompt="a brick wall", steps=4)
    assert_same_pictures(compiled.generate(request, [5]), plain.generate(request, [5]))
    assert is_compiled(compiled.pipe)


def test_a_composed_prompt_on_a_compiled_model_runs_eagerly_and_the_next_plain_one_is_compiled_again(engines):
    """AND runs a row per part through hooks around the UNet, which the CUDA graphs were captured without."""
    from webui.engine.fast_path import is_compiled

    compiled, plain = engines
    composed = GenerationRequest(prompt="a red apple AND a green pear:0.5", steps=4, sampler_name="Euler a")
    assert_same_pictures(compiled.generate(composed, [6, 7]), plain.generate(composed, [6, 7]))
    request = GenerationRequest(prompt="a red apple", steps=4, sampler_name="Euler a")
    assert_same_pictures(compiled.generate(request, [6]), plain.generate(request, [6]))
    assert is_compiled(compiled.pipe)
