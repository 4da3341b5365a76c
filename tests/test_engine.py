"""The engine on a tiny random model: samplers, seeds, batches, clip skip, safety, VAE fall-back."""
import dataclasses

import numpy as np
import pytest
import torch

from webui.engine.generate import Engine
from webui.engine.models import ModelRegistry
from webui.engine.samplers import sampler_names
from webui.schemas import GenerationRequest
from tests.conftest import TINY


def run(engine, seeds, **fields):
    request = GenerationRequest(prompt="a red apple", steps=3, **fields)
    return [np.asarray(r.image, dtype=np.int16) for r in engine.generate(request, seeds)]


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_makes_an_image(engine, sampler):
    request = GenerationRequest(prompt="a cat", sampler_name=sampler, steps=4, cfg_scale=5)
    [result] = engine.generate(request, [7])
    pixels = np.asarray(result.image)
    assert result.image.size == (64, 64) and result.seed == 7
    assert np.isfinite(pixels).all() and pixels.std() > 0


def test_same_seed_same_pixels_other_seed_other_pixels(engine):
    a, b, c = run(engine, [11])[0], run(engine, [11])[0], run(engine, [12])[0]
    assert (a == b).all()
    assert np.abs(a - c).mean() > 1


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DPM++ SDE"])
def test_image_i_of_a_batch_equals_a_single_run_with_its_seed(engine, sampler):
    batch = run(engine, [100, 101, 102], sampler_name=sampler)
    for i, seed in enumerate([100, 101, 102]):
        single = run(engine, [seed], sampler_name=sampler)[0]
        # Batched and single convolutions may round differently in the last bit.
        assert np.abs(batch[i] - single).max() <= 2, f"image {i} differs from seed {seed} alone"


LONG_NEGATIVE = ", ".join(["blurry", "dark", "noisy"] * 40)  # over 75 tokens: two chunks


def test_at_cfg_1_the_negative_prompt_changes_nothing(engine):
    """diffusers runs the prompt alone at CFG 1; a long negative prompt must not pad it either."""
    plain = run(engine, [9], cfg_scale=1.0)[0]
    assert (run(engine, [9], cfg_scale=1.0, negative_prompt=LONG_NEGATIVE)[0] == plain).all()
    assert not engine.pads_prompts(GenerationRequest(prompt="x", negative_prompt=LONG_NEGATIVE, cfg_scale=1))
    assert engine.pads_prompts(GenerationRequest(prompt="x", negative_prompt=LONG_NEGATIVE, cfg_scale=7))
    assert not engine.pads_prompts(GenerationRequest(prompt=LONG_NEGATIVE, negative_prompt=LONG_NEGATIVE))


def test_size_defaults_to_native_and_follows_request(engine):
    [native] = engine.generate(GenerationRequest(prompt="x", steps=2), [1])
    [wide] = engine.generate(GenerationRequest(prompt="x", steps=2, width=96, height=64), [1])
    assert native.image.size == (64, 64) and wide.image.size == (96, 64)


def test_clip_skip_changes_the_image(engine):
    one, two = run(engine, [5], clip_skip=1)[0], run(engine, [5], clip_skip=2)[0]
    assert np.abs(one - two).mean() > 0.5


def test_step_callback_sees_every_step_and_can_stop_the_run(engine):
    seen = []

    class Stop(Exception):
        pass

    def on_step(step, total, latents):
        if step == 0:  # no step ended: a chance to stop (between encodes, inside a model call)
            assert latents is None
            return
        seen.append((step, total, tuple(latents.shape)))
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        engine.generate(GenerationRequest(prompt="x", steps=5), [1], on_step)
    assert seen == [(1, 5, (1, 4, 32, 32)), (2, 5, (1, 4, 32, 32))]


def test_a_stop_is_heard_inside_a_model_call(engine):
    """On a CPU one model call at a large size takes minutes: Interrupt must not wait for it to end."""
    from webui.engine.generate import DenoisingStopped

    unet = engine.pipe.unet
    started, finished = [], []
    handles = [unet.conv_in.register_forward_pre_hook(lambda module, args: started.append(1)),
               unet.register_forward_hook(lambda module, args, output: finished.append(1))]

    def on_step(step, total, latents):
        if started:  # the first model call has begun
            raise DenoisingStopped

    try:
        with pytest.raises(DenoisingStopped):
            engine.generate(GenerationRequest(prompt="x", steps=3), [1], on_step)
    finally:
        for handle in handles:
            handle.remove()
    assert started and not finished  # stopped before the call ended
    assert not unet.down_blocks[0]._forward_pre_hooks  # the checks come off with the run
    assert len(engine.generate(GenerationRequest(prompt="x", steps=2), [1])) == 1  # the next run goes on


def test_a_stop_is_heard_between_the_layers_of_a_block(engine):
    """At 2048x2048 on a CPU one block of a model call takes a minute or more (a probe's Interrupt took 4-5 minutes):
    the check runs before each residual and transformer layer too, not only before each block."""
    from webui.engine.unet_hooks import stoppable_inside_calls

    unet = engine.pipe.unet
    blocks = [[layer for layer in block.modules() if type(layer).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")]
              for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks)]
    layers = next(layers for layers in blocks if len(layers) >= 2)  # the first block with two (the tiny UNet's)
    ran = []
    handles = [layer.register_forward_hook(lambda module, args, output: ran.append(module)) for layer in layers]

    class Stop(Exception):
        pass

    def check():
        if ran:
            raise Stop

    sample = torch.zeros(1, unet.config.in_channels, 8, 8)
    text = torch.zeros(1, 77, unet.config.cross_attention_dim)
    try:
        with torch.no_grad(), stoppable_inside_calls(unet, check), pytest.raises(Stop):
            unet(sample, 10, encoder_hidden_states=text)
    finally:
        for handle in handles:
            handle.remove()
    assert len(ran) == 1  # stopped before the block's second layer ran


def test_nan_from_a_half_precision_vae_is_decoded_again_in_fp32(engine, monkeypatch):
    vae = engine.pipe.vae
    real_decode = vae.decode
    calls = []

    def decode(latents, *args, **kwargs):
        calls.append(latents.dtype)
        out = real_decode(latents, *args, **kwargs)
        if latents.dtype != torch.float32:  # what an fp16 VAE does on some SD 1.x checkpoints
            out.sample[:] = float("nan")
        return out

    vae.to(torch.bfloat16)
    monkeypatch.setattr(vae, "decode", decode)
    try:
        [result] = engine.generate(GenerationRequest(prompt="x", steps=2), [3])
    finally:
        vae.to(torch.float32)
    assert calls == [torch.bfloat16, torch.float32]
    assert np.asarray(result.image).max() > 0  # not a black image


def test_nan_from_the_unet_is_a_clear_error_and_the_vae_keeps_its_precision(engine, monkeypatch):
    from webui.engine.generate import NonFiniteOutput

    unet = engine.pipe.unet
    real_forward = unet.forward

    def overflowing(*args, **kwargs):  # what an fp16 UNet does on some GPUs and checkpoints
        out = real_forward(*args, **kwargs)
        out[0][:] = float("nan")
        return out

    monkeypatch.setattr(unet, "forward", overflowing)
    with pytest.raises(NonFiniteOutput, match="in full precision"):  # the CPU runs fp32: --no-half would not help
        engine.generate(GenerationRequest(prompt="x", steps=2), [3])
    # a prompt whose brackets weigh a word 1.1 ** 100 times: the prompt is what to change, not the model
    with pytest.raises(NonFiniteOutput, match=r"emphasis weighs words up to 1.38e\+04 .* fewer nested brackets"):
        engine.generate(GenerationRequest(prompt="(" * 100 + "x" + ")" * 100, steps=2), [3])
    engine.pipe.to(torch.bfloat16)  # as fp16 on a GPU
    try:
        with pytest.raises(NonFiniteOutput, match="--no-half"):
            engine.generate(GenerationRequest(prompt="x", steps=2), [3])
        assert engine.pipe.vae.dtype == torch.bfloat16  # not switched for a fault that was not the VAE's
    finally:
        engine.pipe.to(torch.float32)


def test_a_vae_that_gives_nan_even_in_fp32_is_a_clear_error(engine, monkeypatch):
    from webui.engine.generate import NonFiniteOutput

    vae = engine.pipe.vae
    real_decode = vae.decode

    def broken(latents, *args, **kwargs):
        out = real_decode(latents, *args, **kwargs)
        out.sample[:] = float("nan")
        return out

    monkeypatch.setattr(vae, "decode", broken)
    with pytest.raises(NonFiniteOutput, match="VAE is broken"):
        engine.generate(GenerationRequest(prompt="x", steps=2), [3])


def test_pixels_become_the_bytes_diffusers_postprocess_gives():
    """Our conversion runs on the pixels' device; diffusers' own is the reference, including values out
    of range and ones that fall exactly between two byte values."""
    from diffusers.image_processor import VaeImageProcessor

    from webui.engine.generate import to_pil_images

    pixels = torch.randn(3, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 1.2
    pixels[0, 0, 0, :4] = torch.tensor([(k + 0.5) / 255 * 2 - 1 for k in (0, 1, 127, 254)])
    ours = to_pil_images(pixels.half())
    theirs = VaeImageProcessor().postprocess(pixels.half().float(), output_type="pil")
    assert [image.mode for image in ours] == ["RGB"] * 3
    for mine, reference in zip(ours, theirs):
        assert np.array_equal(np.asarray(mine), np.asarray(reference))


def test_safety_checker_blacks_out_flagged_images(tmp_path):
    from tests.tiny_sd import save_tiny_model
    from webui.config import Settings

    save_tiny_model(tmp_path / "checked", safety_checker=True)
    registry = ModelRegistry(tmp_path, tmp_path / "hashes.json")
    engine = Engine(Settings(models_dir=tmp_path, device="cpu"), registry)
    engine.load("checked")
    checker = engine.pipe.safety_checker
    request = GenerationRequest(prompt="x", steps=2)

    with torch.no_grad():
        checker.concept_embeds_weights.fill_(10.0)  # nothing can reach the threshold
    [clean] = engine.generate(request, [1])
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # everything is over the threshold
    [flagged] = engine.generate(request, [1])
    assert not clean.nsfw and np.asarray(clean.image).max() > 0
    assert flagged.nsfw and np.asarray(flagged.image).max() == 0


def test_no_safety_checker_flag_skips_it(tmp_path):
    from tests.tiny_sd import save_tiny_model
    from webui.config import Settings

    save_tiny_model(tmp_path / "checked", safety_checker=True)
    engine = Engine(Settings(models_dir=tmp_path, device="cpu", no_safety_checker=True),
                    ModelRegistry(tmp_path, tmp_path / "hashes.json"))
    engine.load("checked")
    assert engine.pipe.safety_checker is None


def test_failed_load_keeps_the_previous_model(engine, tmp_path):
    from webui.engine.loader import ModelLoadError

    broken = engine.registry.models_dir / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "model_index.json").write_text("{not json")
    engine.registry.refresh()
    with pytest.raises(ModelLoadError, match="could not load model 'broken'"):
        engine.load("broken")
    assert engine.model.entry.name == TINY
    assert run(engine, [1])[0].std() > 0
    broken.joinpath("model_index.json").unlink()
    broken.rmdir()
    engine.registry.refresh()


def test_token_count(engine):
    assert engine.count_tokens("red apple") == 2
    assert engine.count_tokens("") == 0


def test_a_model_that_cannot_be_placed_leaves_the_old_one_working(engine, models_dir, monkeypatch):
    """On a GPU the new model is read before the old one goes (here the GPU is pretended: the placements
    are faked, so both models stay in the CPU's RAM)."""
    import webui.engine.generate as generate
    from webui.engine.loader import ModelLoadError, Placement

    old_pipe = engine.pipe

    def place(pipe, settings, placement):
        if pipe is not old_pipe:
            raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(engine, "placement", Placement("cuda", engine.placement.dtype))
    monkeypatch.setattr(generate, "park_on_cpu", lambda pipe, settings, placement: True)

    import shutil

    shutil.copytree(models_dir / TINY, models_dir / "tiny-copy")
    engine.registry.refresh()
    monkeypatch.setattr(generate, "place_pipeline", place)
    try:
        with pytest.raises(ModelLoadError, match="could not move model 'tiny-copy'.*out of memory"):
            engine.load("tiny-copy")
    finally:
        shutil.rmtree(models_dir / "tiny-copy")
        engine.registry.refresh()
    assert engine.pipe is old_pipe and engine.model.entry.name == TINY
    assert run(engine, [1])[0].std() > 0


def test_short_prompts_encode_as_the_pipeline_does(engine):
    from webui.engine.prompts import encode_prompt_pair

    pipe = engine.pipe
    ours, negative = encode_prompt_pair(pipe, ["a red apple"], [""])
    theirs, their_negative = pipe.encode_prompt("a red apple", "cpu", 1, True, "")
    assert torch.allclose(ours, theirs) and torch.allclose(negative, their_negative)


def test_long_prompts_are_read_in_chunks_not_cut(engine):
    from webui.engine.prompts import encode_prompt_pair

    words = " ".join(["apple"] * 75)  # exactly one chunk
    short, _ = encode_prompt_pair(engine.pipe, [words], [""])
    longer, negative = encode_prompt_pair(engine.pipe, [words + " banana cherry" * 10], ["blurry"])
    assert short.shape[1] == 77 and longer.shape[1] == negative.shape[1] == 154
    # The words past the first 75 tokens change the picture; a truncating encoder would ignore them.
    [a] = engine.generate(GenerationRequest(prompt=words, steps=2), [4])
    [b] = engine.generate(GenerationRequest(prompt=words + " banana cherry" * 10, steps=2), [4])
    assert np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16)).mean() > 0.5


def test_a_gpu_that_torch_cannot_use_is_reported_before_falling_back_to_the_cpu(monkeypatch, caplog):
    import logging
    import shutil

    import torch

    from webui.engine import loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    with caplog.at_level(logging.WARNING, logger="webui.engine.loader"):
        assert loader.pick_device("auto") == "cpu"
    assert "torch" in caplog.text and "cannot use it" in caplog.text
    caplog.clear()
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no NVIDIA tools: a plain CPU machine, no warning
    with caplog.at_level(logging.WARNING, logger="webui.engine.loader"):
        assert loader.pick_device("auto") == "cpu"
    assert caplog.text == ""


def test_clip_skip_beyond_the_text_encoders_layers_says_how_many_it_has(engine):
    layers = engine.pipe.text_encoder.config.num_hidden_layers
    engine.generate(GenerationRequest(prompt="x", steps=1, clip_skip=layers), [1])  # the deepest skip works
    with pytest.raises(ValueError, match=f"has {layers} layers; use 1 to {layers}"):
        engine.generate(GenerationRequest(prompt="x", steps=1, clip_skip=layers + 1), [1])


@pytest.mark.parametrize("partial", ["no folder", "empty folder"])
def test_a_folder_naming_a_safety_checker_it_lacks_loads_without_one(models_dir, tmp_path, caplog, partial):
    """A partial download: model_index.json names the checker (and its feature extractor); the checker's
    folder is missing or holds no weights."""
    import json
    import logging
    import shutil

    from webui.config import Settings

    folder = tmp_path / "models" / "partial"
    shutil.copytree(models_dir / TINY, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "requires_safety_checker": True,
              "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    if partial == "empty folder":
        (folder / "safety_checker").mkdir()
        (folder / "safety_checker" / "config.json").write_text("{}")
    engine = Engine(Settings(models_dir=folder.parent, device="cpu"), ModelRegistry(folder.parent, tmp_path / "h.json"))
    with caplog.at_level(logging.WARNING, logger="webui.engine.loader"):
        engine.load("partial")
    assert engine.pipe.safety_checker is None and "safety checker whose files are missing" in caplog.text
    [result] = engine.generate(GenerationRequest(prompt="x", steps=1), [1])
    assert result.image.size == (64, 64)


@pytest.mark.parametrize("kind, message", [("sdxl", "sdxl is an SDXL refiner .* pick an SDXL base model"),
                                           ("flux", "flux is a FluxPipeline model"),
                                           ("odd-unet", "odd-unet's UNet takes 7 input channels \\(neither a text-to-image")])
def test_a_diffusers_folder_this_app_cannot_run_is_refused_when_loaded(models_dir, tmp_path, kind, message):
    """They loaded as an SD pipeline, then every image failed deep inside diffusers."""
    import json
    import shutil

    from webui.config import Settings
    from webui.engine.loader import ModelLoadError

    folder = tmp_path / "models" / kind
    shutil.copytree(models_dir / TINY, folder)
    part, changes = {
        "sdxl": ("model_index.json", {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}),
        "flux": ("model_index.json", {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}),
        "odd-unet": ("unet/config.json", {"in_channels": 7})}[kind]
    config = json.loads((folder / part).read_text())
    (folder / part).write_text(json.dumps(config | changes))
    engine = Engine(Settings(models_dir=folder.parent, device="cpu"), ModelRegistry(folder.parent, tmp_path / "h.json"))
    with pytest.raises(ModelLoadError, match=message):
        engine.load(kind)


def test_on_the_cpu_a_model_switch_drops_the_old_weights_first_and_restores_them_on_failure(
        models_dir, tmp_path, monkeypatch):
    import shutil

    import webui.engine.generate as generate
    from webui.config import Settings
    from webui.engine.loader import ModelLoadError

    folder = tmp_path / "models"
    for name in ("first", "second", "broken"):
        shutil.copytree(models_dir / TINY, folder / name)
    engine = Engine(Settings(models_dir=folder, device="cpu"), ModelRegistry(folder, tmp_path / "h.json"))
    engine.load("first")
    real_read = generate.read_pipeline
    old_model_in_ram = []

    named_meanwhile = []

    def read(entry, *args):
        old_model_in_ram.append(engine.pipe is not None)
        named_meanwhile.append(engine.model.entry.name)  # what GET /options and the status line see
        if entry.name == "broken":
            raise ModelLoadError("broken weights")
        return real_read(entry, *args)

    monkeypatch.setattr(generate, "read_pipeline", read)
    engine.load("second")
    assert old_model_in_ram == [False] and engine.model.entry.name == "second"
    assert named_meanwhile == ["first"]  # never "no model" while the switch runs
    with pytest.raises(ModelLoadError, match="broken weights"):
        engine.load("broken")
    assert engine.model.entry.name == "second"  # read again after the failed switch
    [result] = engine.generate(GenerationRequest(prompt="x", steps=1), [1])
    assert result.image.size == (64, 64)

    def nothing_loads(entry, *args):  # out of RAM for the old model too: the first error is the one reported
        raise ModelLoadError(f"cannot read {entry.name}")

    monkeypatch.setattr(generate, "read_pipeline", nothing_loads)
    with pytest.raises(ModelLoadError, match="cannot read broken"):
        engine.load("broken")
    assert engine.model is None


def test_on_the_cpu_a_file_plainly_no_model_is_refused_before_the_old_model_goes_and_a_gone_one_falls_back(
        models_dir, tmp_path, monkeypatch):
    """Found by a probe: a damaged checkpoint picked on the CPU dropped the loaded model first, and where that
    model's files were gone too (deleted while loaded), the worker was left with no model at all."""
    import shutil

    import webui.engine.generate as generate
    from webui.config import DEFAULT_MODEL_NAME, Settings
    from webui.engine.loader import ModelLoadError

    folder = tmp_path / "models"
    shutil.copytree(models_dir / TINY, folder / "first")
    (folder / "garbage.safetensors").write_bytes(b"\x00" * 64)  # no safetensors header
    engine = Engine(Settings(models_dir=folder, device="cpu"), ModelRegistry(folder, tmp_path / "h.json"))
    engine.load("first")
    pipe = engine.pipe
    monkeypatch.setattr(generate, "read_pipeline", lambda *args: pytest.fail("a weight was read"))
    with pytest.raises(ModelLoadError, match="could not load model 'garbage': garbage.safetensors is not a readable"):
        engine.load("garbage")
    assert engine.pipe is pipe and engine.model.entry.name == "first"  # kept, not read again
    shutil.copytree(folder / "first", folder / "emptied")
    engine.registry.refresh()
    (folder / "emptied" / "model_index.json").unlink()  # its index gone since the folder was listed
    with pytest.raises(ModelLoadError, match="could not load model 'emptied': .* holds no model_index.json"):
        engine.load("emptied")
    assert engine.pipe is pipe
    monkeypatch.undo()

    shutil.copytree(folder / "first", folder / "second")
    engine.registry.refresh()
    engine.load("second")
    shutil.rmtree(folder / "second")  # deleted while loaded
    real_read = generate.read_pipeline

    def read(entry, *args):
        if entry.name == "first":
            raise ModelLoadError("broken weights")  # past the header: found only in reading
        return real_read(entry, *args)

    monkeypatch.setattr(generate, "read_pipeline", read)
    with pytest.raises(ModelLoadError, match="broken weights"):
        engine.load("first")
    assert engine.model.entry.name == DEFAULT_MODEL_NAME  # the embedded model, where "second" could not come back
    [result] = engine.generate(GenerationRequest(prompt="x", steps=1), [1])
    assert result.image is not None


def test_a_released_gpu_model_waits_in_ram_and_comes_back_without_reading_the_disk(engine, monkeypatch):
    """On a GPU, unload-checkpoint parks the weights in RAM (here the parking is pretended); bringing them
    back moves the same pipeline to the device and reads nothing from disk."""
    import webui.engine.generate as generate

    pipe, before = engine.pipe, run(engine, [3])[0]
    parked, moved = [], []
    monkeypatch.setattr(generate, "park_on_cpu", lambda p, settings, placement: parked.append(p) or True)
    monkeypatch.setattr(generate, "read_pipeline", lambda *args: pytest.fail("the weights were read again"))
    monkeypatch.setattr(pipe, "to", lambda device: moved.append(device) or pipe)

    assert engine.release_device() and engine.released and engine.pipe is pipe and parked == [pipe]
    assert not engine.release_device()  # once is enough
    assert engine.restore_device() is engine.model and not engine.released
    assert moved == [engine.placement.device]
    assert np.array_equal(run(engine, [3])[0], before)


def test_a_released_model_that_is_gone_from_disk_fails_the_next_image_with_its_name(engine, models_dir, monkeypatch):
    import webui.engine.generate as generate
    from webui.engine.loader import ModelLoadError

    def read_fails(entry, settings, placement, *_role):
        raise ModelLoadError(f"could not load model {entry.name!r}: no such file")

    engine.release_device()  # on the CPU: dropped, to be read again
    monkeypatch.setattr(generate, "read_pipeline", read_fails)
    with pytest.raises(ModelLoadError, match=f"'{TINY}'"):
        engine.restore_device()
    assert engine.released  # still released, and the next try reads it again
    monkeypatch.undo()
    assert engine.restore_device() is engine.model and run(engine, [1])[0].std() > 0


def test_a_half_precision_read_gives_half_weights_and_no_deprecation_warning(engine):
    """diffusers 0.42 renamed torch_dtype to dtype; the old name printed a FutureWarning at every start."""
    import warnings

    from webui.engine.loader import Placement, read_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = read_pipeline(engine.registry.find(TINY), engine.settings, Placement("cpu", torch.float16))
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16


def test_xformers_that_does_not_work_here_is_not_enabled(engine, monkeypatch, caplog):
    """Enabling a wheel built for another torch succeeds, and then every image fails."""
    import dataclasses
    import logging

    import webui.engine.fast_path as fast_path
    from webui.engine.loader import _choose_attention

    enabled = []
    pipe = type("Pipe", (), {"enable_xformers_memory_efficient_attention": lambda self: enabled.append(1)})()
    settings = dataclasses.replace(engine.settings, xformers=True)
    monkeypatch.setattr(fast_path, "xformers_works", lambda: False)
    with caplog.at_level(logging.WARNING, logger="webui.engine.loader"):
        _choose_attention(pipe, settings)
    assert enabled == [] and "does not work with this torch" in caplog.text
    monkeypatch.setattr(fast_path, "xformers_works", lambda: True)
    _choose_attention(pipe, settings)
    assert enabled == [1]


def test_a_released_model_stays_off_the_gpu_when_a_switch_fails(engine, models_dir, monkeypatch):
    """Released for another program (which now holds the GPU), a failed switch must not take the GPU back for
    the old model (here the GPU is pretended: placements are recorded)."""
    import shutil

    import webui.engine.generate as generate
    from webui.engine.loader import ModelLoadError, Placement

    old_pipe, placed = engine.pipe, []

    def place(pipe, settings, placement):
        placed.append(pipe)
        if pipe is not old_pipe:
            raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(engine, "placement", Placement("cuda", engine.placement.dtype))
    monkeypatch.setattr(generate, "park_on_cpu", lambda pipe, settings, placement: True)
    monkeypatch.setattr(generate, "place_pipeline", place)
    shutil.copytree(models_dir / TINY, models_dir / "tiny-copy")
    engine.registry.refresh()
    try:
        assert engine.release_device()
        with pytest.raises(ModelLoadError, match="out of memory"):
            engine.load("tiny-copy")
        assert old_pipe not in placed and engine.released and engine.pipe is old_pipe
    finally:
        shutil.rmtree(models_dir / "tiny-copy")
        engine.registry.refresh()
        monkeypatch.undo()
        engine.restore_device()


def test_a_released_model_that_cannot_go_back_says_why_and_stays_whole_in_ram(engine, monkeypatch):
    import webui.engine.generate as generate
    from webui.engine.loader import ModelLoadError, Placement

    pipe, moves = engine.pipe, []

    def to(device):
        moves.append(device)
        if device != "cpu":
            raise RuntimeError("CUDA out of memory")
        return pipe

    monkeypatch.setattr(engine, "placement", Placement("cuda", engine.placement.dtype))
    monkeypatch.setattr(generate, "park_on_cpu", lambda p, settings, placement: True)
    monkeypatch.setattr(pipe, "to", to)
    try:
        engine.release_device()
        with pytest.raises(ModelLoadError, match=f"could not move {TINY} back to cuda.*another program"):
            engine.restore_device()
        assert moves == ["cuda", "cpu"] and engine.released  # not half on the GPU; the next image tries again
    finally:
        monkeypatch.undo()
        engine.restore_device()


def test_the_token_counter_works_while_the_model_is_released(engine):
    counted = engine.count_tokens("a red apple")
    engine.release_device()  # on the CPU the weights are dropped
    try:
        assert engine.pipe is None and engine.count_tokens("a red apple") == counted == 3
    finally:
        engine.restore_device()


def test_on_the_cpu_a_released_model_stays_released_when_a_switch_fails(engine, monkeypatch):
    """Its RAM was given back on purpose (unload-checkpoint): a failed switch must not read it back in."""
    import webui.engine.generate as generate
    from webui.engine.loader import ModelLoadError

    reads = []

    def read_fails(entry, settings, placement, *_role):
        reads.append(entry.name)
        raise ModelLoadError(f"could not load model {entry.name!r}")

    engine.release_device()
    monkeypatch.setattr(generate, "read_pipeline", read_fails)
    monkeypatch.setattr(generate, "_check_files_of", lambda entry: None)  # its files pass, and its read fails
    monkeypatch.setattr(engine.registry, "find", lambda name: dataclasses.replace(engine.model.entry, name=name,
                                                                                   source=f"/elsewhere/{name}"))
    try:
        with pytest.raises(ModelLoadError, match="'other'"):
            engine.load("other")
        assert reads == ["other"] and engine.released and engine.model.entry.name == TINY
    finally:
        monkeypatch.undo()
        engine.restore_device()
    assert run(engine, [1])[0].std() > 0


# --- variation seeds ----------------------------------------------------------------------------
def test_slerp_goes_from_one_noise_to_the_other_keeping_the_norm():
    from webui.engine.noise import slerp

    a = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1))
    b = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-6) and torch.allclose(slerp(1.0, a, b), b, atol=1e-6)
    halfway = slerp(0.5, a, b)
    assert abs(halfway.norm() / a.norm() - 1) < 0.05  # a straight blend would have ~0.71 of the norm
    assert abs((a + b).div(2).norm() / a.norm() - 0.71) < 0.05
    # The angle is taken per channel and column, as A1111 takes it: unit columns stay unit columns.
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    assert torch.allclose(slerp(0.3, a, b).norm(dim=1), torch.ones(4, 8), atol=1e-5)


def varied(engine, seeds, subseeds, strength, sampler):
    request = GenerationRequest(prompt="a red apple", steps=3, sampler_name=sampler, subseed_strength=strength)
    return [np.asarray(r.image, dtype=np.int16) for r in engine.generate(request, seeds, subseeds=subseeds)]


def test_full_variation_strength_is_the_variation_seeds_picture(engine):
    """Euler draws no noise after the first: at strength 1 the start is the variation seed's noise alone."""
    full = varied(engine, [5, 6], [40, 41], 1.0, "Euler")
    plain = run(engine, [5, 6], sampler_name="Euler")
    for i, subseed in enumerate([40, 41]):
        assert np.abs(full[i] - run(engine, [subseed], sampler_name="Euler")[0]).max() <= 2
        assert np.abs(full[i] - plain[i]).mean() > 1


def test_a_small_variation_strength_changes_the_picture_a_little(engine):
    plain = run(engine, [9], sampler_name="Euler a")[0]
    other = run(engine, [400], sampler_name="Euler a")[0]
    slight = varied(engine, [9], [400], 0.1, "Euler a")[0]
    # Near the seed's own picture (the ancestral noise after the start still comes from the seed), not the other's.
    assert 0 < np.abs(slight - plain).mean() < np.abs(slight - other).mean() / 3
