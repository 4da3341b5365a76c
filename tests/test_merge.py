"""The checkpoint merger (webui/engine/merge.py and the Checkpoint Merger tab)."""
import hashlib
import json

import numpy as np
import pytest
import torch

from tests.tiny_sd import save_tiny_model
from webui.config import Settings
from webui.engine.generate import Engine
from webui.engine.merge import ADD_DIFFERENCE, NO_INTERPOLATION, MergeError, MergeRecipe, merge_models
from webui.engine.models import ModelRegistry
from webui.schemas import GenerationRequest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three tiny models of different random weights, and an inpainting one."""
    models = tmp_path_factory.mktemp("merge-models")
    for seed, name in enumerate(["a", "b", "c"]):
        save_tiny_model(models / name, seed=seed)
    save_tiny_model(models / "inpainting", seed=3, in_channels=9)
    return models


@pytest.fixture
def registry(folder, tmp_path):
    yield ModelRegistry(folder, tmp_path / "hashes.json")
    for made in folder.iterdir():  # each test's merges go; the four sources stay
        if made.name not in ("a", "b", "c", "inpainting"):
            import shutil

            shutil.rmtree(made) if made.is_dir() else made.unlink()


def weights(folder, name: str, part: str = "unet") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    [file] = (folder / name / part).glob("*.safetensors")
    return load_file(file)


def settings(folder) -> Settings:
    return Settings(models_dir=folder, device="cpu")


def test_a_weighted_sum_is_each_weight_moved_towards_b(folder, registry):
    made = merge_models(MergeRecipe("a", "b", multiplier=0.3), registry, settings(folder))
    assert made.name == "a_0.7-b_0.3-Weighted_sum-merged" and "a_0.7-b_0.3-Weighted_sum-merged" in [
        entry.name for entry in registry.entries()]
    for part in ("unet", "text_encoder", "vae"):
        a, b, merged = weights(folder, "a", part), weights(folder, "b", part), weights(folder, made.name, part)
        assert merged.keys() == a.keys()
        for key in a:
            if a[key].is_floating_point():
                assert torch.allclose(merged[key], 0.7 * a[key] + 0.3 * b[key], atol=1e-6), (part, key)
    recipe = json.loads((made / "merge_recipe.json").read_text())
    assert recipe["primary"] == "a" and recipe["secondary"] == "b" and recipe["multiplier"] == 0.3
    assert recipe["bake_in_vae"] == "None" and recipe["bake_in_vae_hash"] is None


def test_add_difference_adds_b_minus_c_and_saves_in_half_precision(folder, registry):
    made = merge_models(MergeRecipe("a", "b", "c", method=ADD_DIFFERENCE, multiplier=0.5, save_as_half=True,
                                    name="a plus half b-c"), registry, settings(folder))
    a, b, c, merged = (weights(folder, name) for name in ("a", "b", "c", made.name))
    key = "conv_in.weight"
    assert merged[key].dtype == torch.float16
    assert torch.allclose(merged[key].float(), a[key] + 0.5 * (b[key] - c[key]), atol=2e-3)


def test_the_merged_model_loads_and_draws_between_its_sources(folder, registry):
    made = merge_models(MergeRecipe("a", "b", multiplier=0.5), registry, settings(folder))
    engine = Engine(settings(folder), registry)
    request = GenerationRequest(prompt="a red apple", steps=3, width=64, height=64)

    def picture(name):
        engine.load(name)
        return np.asarray(engine.generate(request, [3])[0].image, np.int16)

    merged, a, b = picture(made.name), picture("a"), picture("b")
    assert np.abs(merged - a).mean() > 1 and np.abs(merged - b).mean() > 1


def test_an_inpainting_a_merges_its_first_four_input_channels_with_a_text_to_image_b(folder, registry):
    made = merge_models(MergeRecipe("inpainting", "b", "c", method=ADD_DIFFERENCE, multiplier=1.0), registry,
                        settings(folder))
    a, b, c, merged = (weights(folder, name) for name in ("inpainting", "b", "c", made.name))
    assert merged["conv_in.weight"].shape[1] == 9
    assert torch.allclose(merged["conv_in.weight"][:, :4], a["conv_in.weight"][:, :4] + b["conv_in.weight"]
                          - c["conv_in.weight"], atol=1e-6)
    assert torch.equal(merged["conv_in.weight"][:, 4:], a["conv_in.weight"][:, 4:])  # mask and picture channels
    with pytest.raises(MergeError, match="make the inpainting model A"):
        merge_models(MergeRecipe("b", "inpainting", multiplier=0.5), registry, settings(folder))


def test_no_interpolation_copies_a(folder, registry):
    made = merge_models(MergeRecipe("a", method=NO_INTERPOLATION), registry, settings(folder))
    assert made.name == "a-merged"
    a, copied = weights(folder, "a"), weights(folder, "a-merged")
    assert all(torch.equal(copied[key], a[key]) for key in a)


@pytest.mark.parametrize("recipe, message", [
    (MergeRecipe("a", None), "needs a secondary model"),
    (MergeRecipe("a", "b", None, method=ADD_DIFFERENCE), "needs a tertiary model"),
    (MergeRecipe("a", "b", multiplier=1.5), "from 0 to 1"),
    (MergeRecipe("a", "b", name="../outside"), "use no /"),
    (MergeRecipe("a", "b", name=".hidden"), "do not start it with a dot"),
    (MergeRecipe("a", "b", name="b"), "is in the models folder already"),
    (MergeRecipe("a", "b", name="taken"), "is in the models folder already"),  # taken.safetensors is there
    (MergeRecipe("a", "b", name="mix [20240115]"), "reads as a model hash"),
    (MergeRecipe("a", "b", name="Lora"), "holds LoRAs, embeddings or VAEs"),
    (MergeRecipe("a", "b", name="vae"), "holds LoRAs, embeddings or VAEs"),
    (MergeRecipe("a", "b", name="mix.safetensors"), "leave the suffix out"),
    (MergeRecipe("a", "b", name="con"), "device name on Windows"),
    (MergeRecipe("a", "b", name="漢" * 85), "at most 200 bytes"),
    (MergeRecipe("a", "b", method="Sigmoid"), "choose one of"),
    (MergeRecipe("a", "nowhere"), "not found"),
    (MergeRecipe("a", "b", discard_weights="unet.(conv"), "Discard weights 'unet.\\(conv' is no regular expression"),
    (MergeRecipe("a", "b", discard_weights="model_ema"), "matches no weight of the model; weights are named by part"),
    (MergeRecipe("a", method=NO_INTERPOLATION, discard_weights="unet"), "with No interpolation every weight is A's"),
])
def test_a_merge_that_cannot_be_made_says_what_to_change_and_writes_nothing(folder, registry, recipe, message):
    (folder / "taken.safetensors").write_bytes(b"")
    before = sorted(path.name for path in folder.iterdir())
    with pytest.raises(ValueError, match=message):
        merge_models(recipe, registry, settings(folder))
    assert sorted(path.name for path in folder.iterdir()) == before


def test_models_of_different_kinds_are_refused_and_a_failed_write_leaves_nothing(folder, registry, monkeypatch,
                                                                                tmp_path):
    from tests.tiny_sd import make_tiny_pipeline

    wide = make_tiny_pipeline(seed=5)
    wide.unet = type(wide.unet)(**{**wide.unet.config, "cross_attention_dim": 64})
    wide.save_pretrained(folder / "wide")
    registry.refresh()
    before = sorted(path.name for path in folder.iterdir())
    with pytest.raises(MergeError, match="different kinds"):
        merge_models(MergeRecipe("a", "wide", multiplier=0.5), registry, settings(folder))

    from diffusers import StableDiffusionPipeline

    def full_disk(self, save_directory, *args, **kwargs):  # half a model written, then the disk is full
        (save_directory / "unet").mkdir(parents=True)
        (save_directory / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", full_disk)
    with pytest.raises(OSError):
        merge_models(MergeRecipe("a", "b", multiplier=0.5), registry, settings(folder))
    assert sorted(path.name for path in folder.iterdir()) == before  # no partial folder left


# --- the Checkpoint Merger tab -------------------------------------------------------------------
def merge_event(ui):
    """The Merge button's function and what Gradio runs after it: the model picker's list, then the tab's own (the
    refiner's and hires fix's checkpoint lists follow too, wired in blocks.py)."""
    fns = list(ui.blocks.fns.values())
    [merge] = [fn for fn in fns if getattr(fn.fn, "__name__", None) == "merge"]
    [then] = [fn for fn in fns if fn.trigger_after == merge._id
              and [block.elem_id for block in fn.outputs] == ["model_dropdown"]]
    [after] = [fn for fn in fns if fn.trigger_after == then._id]
    return merge.fn, lambda: (then.fn(), after.fn())


def test_the_tab_merges_lists_the_new_model_and_says_what_to_change(folder, tmp_path):
    from tests.helpers import running_services
    from webui.ui.blocks import create_ui

    own = tmp_path / "models"
    own.mkdir()
    for name in ("a", "b"):
        (own / name).symlink_to(folder / name, target_is_directory=True)
    for services in running_services(own, tmp_path / "out", ckpt="a"):
        ui = create_ui(services)
        assert [c[0] for c in ui.merger.primary.choices] == ["a", "b"]
        merge, then = merge_event(ui)
        said = merge("a", "b", "", "Weighted sum", 0.25, False, "my mix")
        assert "Saved my mix" in said and (own / "my mix" / "model_index.json").exists()
        picker, (primary, secondary, tertiary) = then()
        assert "my mix" in picker["choices"]  # the model picker lists it, and so do the tab's own lists
        assert primary["choices"] == ["a", "b", "my mix"] and secondary["choices"] == ["", "a", "b", "my mix"]
        said = merge("a", "", "", "Add difference", 1.0, False, "")
        assert "Not merged" in said and "needs a secondary model (B)" in said
        said = merge("a", "b", "", "Weighted sum", 0.5, False, "kept", "None", "^unet.(")
        assert "Not merged: Discard weights" in said and "no regular expression" in said
        said = merge("a", "b", "", "Weighted sum", 0.5, False, "kept", "None", r"^text_encoder\.")
        assert "Saved kept" in said and json.loads((own / "kept" / "merge_recipe.json").read_text())[
            "discard_weights"] == r"^text_encoder\."
        job = services.worker.submit({"prompt": "x", "steps": 1, "model": "my mix", "width": 64, "height": 64})
        assert job.wait(60) and job.error is None and services.engine.model.entry.name == "my mix"


def test_a_name_made_of_long_model_names_is_cut_to_fit_and_cleaned():
    recipe = MergeRecipe("SD15/" + "realisticVision_v51HyperVAE-inpainting" * 4 + ".safetensors", "epic:real|ism",
                         multiplier=0.3)
    name = recipe.folder_name()
    assert len(name.encode()) <= 200 and name.startswith("realisticVision_v51HyperVAE")
    assert ":" not in name and "|" not in name and "/" not in name


def test_one_merge_at_a_time(folder, tmp_path):
    from tests.helpers import running_services
    from webui.ui.merger import MergerActions

    for services in running_services(folder, tmp_path / "out", ckpt="a"):
        actions = MergerActions(services)
        with actions._one_at_a_time:  # as while another page's merge runs
            said = actions.merge("a", "b", "", "Weighted sum", 0.5, False, "second")
        assert "another merge is running" in said and not (folder / "second").exists()


def test_a_page_open_to_anyone_may_not_merge(folder, tmp_path):
    from tests.helpers import running_services
    from webui.ui.blocks import create_ui

    for services in running_services(folder, tmp_path / "out", ckpt="a", listen=True):
        ui = create_ui(services)
        merge, _ = merge_event(ui)
        said = merge("a", "b", "", "Weighted sum", 0.5, False, "sneaky")
        assert "Not merged" in said and "--gradio-auth" in said and not (folder / "sneaky").exists()
        assert ui.merger.merge.interactive is False


def test_a_start_removes_what_a_merge_killed_a_day_ago_left_and_keeps_a_running_ones(folder, tmp_path):
    import os
    import time

    from tests.helpers import running_services

    old, running = folder / ".partial-old-mix-0badf00d", folder / ".partial-new-mix-12345678"
    for partial in (old, running):
        (partial / "unet").mkdir(parents=True)
        (partial / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    try:
        for _services in running_services(folder, tmp_path / "out", ckpt="a"):
            assert not old.exists() and running.exists()
    finally:
        import shutil

        shutil.rmtree(running, ignore_errors=True)


def test_bake_in_vae_puts_a_vae_files_weights_in_the_merged_model(folder, registry):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from tests._single_file_ldm import vae_to_ldm

    (folder / "VAE").mkdir()
    vae = AutoencoderKL.from_pretrained(folder / "c" / "vae")
    save_file({key.removeprefix("first_stage_model."): value.contiguous() for key, value in vae_to_ldm(vae).items()},
              str(folder / "VAE" / "c-vae.safetensors"))
    with pytest.raises(MergeError, match="Bake in VAE: there is no VAE 'nope.pt'"):
        merge_models(MergeRecipe("a", "b", bake_in_vae="nope.pt"), registry, settings(folder))
    made = merge_models(MergeRecipe("a", "b", multiplier=0.5, bake_in_vae="c-vae.safetensors"), registry,
                        settings(folder))
    baked, c = weights(folder, made.name, "vae"), weights(folder, "c", "vae")
    assert all(torch.equal(baked[key], c[key]) for key in c)  # the file's VAE, not a mix of A's and B's
    a, b, unet = weights(folder, "a"), weights(folder, "b"), weights(folder, made.name)
    assert torch.allclose(unet["conv_in.weight"], 0.5 * a["conv_in.weight"] + 0.5 * b["conv_in.weight"], atol=1e-6)
    recipe = json.loads((made / "merge_recipe.json").read_text())
    vae_hash = hashlib.sha256((folder / "VAE" / "c-vae.safetensors").read_bytes()).hexdigest()[:10]  # as A1111's
    assert recipe["bake_in_vae"] == "c-vae.safetensors" and recipe["bake_in_vae_hash"] == vae_hash


def test_discard_weights_keeps_the_matching_weights_as_as_and_merges_the_rest(folder, registry):
    """A1111's Discard weights leaves the weights out of its file; a diffusers folder must hold them all (one without
    a weight loads it as random numbers), so here they stay A's, and the model loads and draws."""
    made = merge_models(MergeRecipe("a", "b", multiplier=0.5, discard_weights=r" ^text_encoder\.|^unet\.conv_in\. "),
                        registry, settings(folder))
    a, b, merged = (weights(folder, name, "text_encoder") for name in ("a", "b", made.name))
    assert merged.keys() == a.keys() and all(torch.equal(merged[key], a[key]) for key in a)
    a, b, merged = (weights(folder, name) for name in ("a", "b", made.name))
    assert merged.keys() == a.keys()
    for key in a:
        expected = a[key] if key.startswith("conv_in.") else 0.5 * a[key] + 0.5 * b[key]
        assert torch.allclose(merged[key], expected, atol=1e-6), key
    recipe = json.loads((made / "merge_recipe.json").read_text())
    assert recipe["discard_weights"] == r" ^text_encoder\.|^unet\.conv_in\. "
    assert recipe["discarded_weights"] == len(weights(folder, "a", "text_encoder")) + 2  # conv_in's weight and bias
    engine = Engine(settings(folder), registry)
    engine.load(made.name)
    image = engine.generate(GenerationRequest(prompt="x", steps=1, width=64, height=64), [1])[0].image
    assert np.asarray(image).std() > 0


def test_a_refused_name_is_shown_as_typed(tmp_path):
    """'..' was shown as '' (the cut of a shown name stripped its dots, which were the problem). Found by a probe."""
    from webui.engine.merge import check_recipe

    with pytest.raises(MergeError, match=r"name '\.\.': use no / "):
        check_recipe(MergeRecipe("a", "b", name=".."), tmp_path)
