"""ControlNet (sd-webui-controlnet's, one unit): the models folder, the Canny preprocessor, the UNet hook in every
pass, the request's checks, the infotext, and its UI and API. Tiny random ControlNets are made from the tiny
model's UNet (ControlNetModel.from_unet), with their zero-initialised output convolutions randomised so they steer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY
from tests.helpers import noise_picture, running_services
from tests.tiny_sd import save_tiny_model, tiny_components
from webui.controlnet import controlnet_fields
from webui.engine.canny import _hysteresis, canny
from webui.engine.controlnet import ControlNetError, ControlUnit, detect_map, fit_map, pixel_perfect_resolution
from webui.engine.img2img import fit_image
from webui.schemas import GenerationRequest, InvalidRequest, JobState
from webui.storage.infotext import request_fields_from_infotext

CN = "tiny-cn"
QUICK = {"prompt": "a house", "steps": 2, "seed": 3, "cfg_scale": 5.0}


def tiny_controlnet(unet, seed: int = 1):
    """A ControlNet of `unet`'s shape whose residuals are not zero (from_unet zeroes its output convolutions)."""
    from diffusers import ControlNetModel

    network = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))  # 2x down: the tiny VAE's
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*network.controlnet_down_blocks, network.controlnet_mid_block,
                       network.controlnet_cond_embedding.conv_out]:
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.3)
    return network


def other_kind_controlnet():
    """A ControlNet for a model whose text embeddings are 64 wide: another kind than the tiny model (32)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=4, norm_num_groups=8)
    return tiny_controlnet(unet)


@pytest.fixture(scope="module")
def cn_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn-models")
    save_tiny_model(folder / TINY)
    tiny_controlnet(tiny_components()["unet"]).save_pretrained(folder / "ControlNet" / CN)
    other_kind_controlnet().save_pretrained(folder / "ControlNet" / "sdxl-like-cn")
    return folder


@pytest.fixture(scope="module")
def cn_services(cn_models, tmp_path_factory):
    yield from running_services(cn_models, tmp_path_factory.mktemp("cn-out"))


@pytest.fixture(scope="module")
def cn_engine(cn_services):
    return cn_services.engine


def square(contrast: int = 255, size: int = 64) -> Image.Image:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[16:48, 16:48] = contrast
    return Image.fromarray(pixels)


def run(worker, fields: dict, **pictures):
    job = worker.submit(QUICK | fields, **pictures)
    assert job.wait(120) and job.state is JobState.DONE, job.error
    return job


def pixels(job) -> np.ndarray:
    return np.asarray(job.images[0].image, np.int16)


def title(engine) -> str:
    return engine.controlnets.find(CN).title


def controlnet_on(engine, **fields) -> dict:
    return {"controlnet_enabled": True, "controlnet_model": title(engine), "controlnet_module": "canny"} | fields


class Calls:
    """Records each call of the ControlNet (the size of its control map, its sample's rows) and whether the UNet
    call after it got residuals."""

    def __init__(self, engine):
        network = engine.controlnets.network(engine.controlnets.find(CN), engine.pipe.unet.config, "cpu",
                                         torch.float32)  # the job's, cached
        self.conds, self.residuals = [], []
        self.handles = [
            network.register_forward_pre_hook(self._cond, with_kwargs=True),
            engine.pipe.unet.register_forward_hook(self._unet, with_kwargs=True),
        ]

    def _cond(self, _module, args, kwargs):
        self.conds.append((tuple(kwargs["controlnet_cond"].shape), args[0].shape[0]))

    def _unet(self, _module, _args, kwargs, _output):
        self.residuals.append(kwargs.get("mid_block_additional_residual") is not None)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for handle in self.handles:
            handle.remove()


# --- the Canny preprocessor --------------------------------------------------------------------------
def test_canny_finds_the_outline_of_a_square_and_nothing_else():
    edges = canny(np.asarray(square()), 100, 200) > 0
    ring = np.zeros_like(edges)
    ring[15:48, 15:48] = True
    ring[17:46, 17:46] = False  # a one- or two-pixel line around the square's border
    assert edges.any() and not (edges & ~ring).any()
    assert edges[30, 15:17].any() and edges[30, 46:48].any() and edges[15:17, 30].any() and edges[46:48, 30].any()
    assert edges[15:48, 15:48].sum() >= 4 * 30  # the whole outline, one pixel thick at least


def test_canny_thresholds_decide_which_edges_count():
    faint = np.asarray(square(contrast=40))
    assert not canny(faint, 100, 200).any()  # the extension's defaults leave a faint square out
    assert canny(faint, 20, 50).sum() == canny(np.asarray(square()), 100, 200).sum()  # lower ones keep it
    assert canny(faint, 100, 110).any()  # its edges (120 strong, after the blur) are above a high threshold of 110
    # Hysteresis: a weak line counts where it touches a strong pixel, and only then.
    magnitude = np.zeros((8, 32), np.float32)
    magnitude[2, 1:30] = 150  # weak: between 100 and 200
    magnitude[2, 0] = magnitude[5, 31] = 250  # strong; only the first touches the line
    edges = _hysteresis(magnitude, 100, 200) > 0
    assert edges[2, :30].all() and not edges[2, 30] and edges[5, 31] and edges.sum() == 31


def test_the_preprocessors_give_the_extensions_maps():
    picture = noise_picture(1, 96, 64)
    assert detect_map(picture, "none") is picture
    assert np.array_equal(np.asarray(detect_map(picture, "invert")), 255 - np.asarray(picture))
    edges = detect_map(square(), "canny", processor_res=128)
    assert edges.size == (128, 128) and edges.mode == "RGB"  # found at the resolution asked (the short side)
    assert set(np.unique(np.asarray(edges))) == {0, 255}
    assert pixel_perfect_resolution((256, 128), (64, 64), 1) == 64  # crop and resize: by the larger scale
    assert pixel_perfect_resolution((256, 128), (64, 64), 2) == 32  # resize and fill: by the smaller


# --- models -----------------------------------------------------------------------------------------------
def test_controlnet_models_are_listed_with_the_extensions_hash_and_never_as_checkpoints(cn_engine):
    titles = cn_engine.controlnets.titles()
    assert [t.rsplit(" ", 1)[0] for t in titles] == ["sdxl-like-cn", CN]
    assert all(len(t.rsplit("[", 1)[1].rstrip("]")) == 8 for t in titles)
    assert cn_engine.controlnets.find(CN.upper()) == cn_engine.controlnets.find(title(cn_engine))  # name alone
    assert all("ControlNet" not in entry.name for entry in cn_engine.registry.entries())



def controlnet_to_ldm(network, unet_config) -> dict[str, torch.Tensor]:
    """A ControlNet's weights in the original layout (control_model.*), as lllyasviel's files hold them."""
    import re

    from diffusers import UNet2DConditionModel

    from tests._single_file_ldm import UNET, unet_to_ldm

    shared = UNet2DConditionModel.from_config(unet_config)  # the encoder half it shares, named as a UNet's
    shared.load_state_dict(network.state_dict(), strict=False)
    ldm = {key.removeprefix(UNET): value for key, value in unet_to_ldm(shared).items()}
    ldm = {key: value for key, value in ldm.items() if key.startswith(("input_blocks", "middle_block", "time_embed"))}
    renames = [(r"controlnet_down_blocks\.(\d+)\.", lambda m: f"zero_convs.{m[1]}.0."),
               (r"controlnet_mid_block\.", lambda m: "middle_block_out.0."),
               (r"controlnet_cond_embedding\.conv_in\.", lambda m: "input_hint_block.0."),
               (r"controlnet_cond_embedding\.conv_out\.", lambda m: "input_hint_block.14."),
               (r"controlnet_cond_embedding\.blocks\.(\d+)\.", lambda m: f"input_hint_block.{2 * int(m[1]) + 2}.")]
    for key, value in network.state_dict().items():
        for pattern, name in renames:
            if match := re.match(pattern, key):
                ldm[name(match) + key[match.end():]] = value
    return {f"control_model.{key}": value.contiguous() for key, value in ldm.items()}


ORIGINAL_YAML = """model:
  params:
    control_stage_config: {params: {hint_channels: 3}}
    unet_config:
      params: {in_channels: 4, out_channels: 4, model_channels: 32, channel_mult: [1, 2], attention_resolutions: [2],
               num_res_blocks: 1, transformer_depth: 1, num_heads: 4, context_dim: 32,
               use_linear_in_transformer: false}
    first_stage_config: {params: {ddconfig: {ch_mult: [1, 2]}}}
"""


def test_a_single_file_in_the_original_layout_loads_by_the_yaml_beside_it(tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    from webui.engine.controlnet import ControlNetLibrary, read_network

    # Original ControlNets' GroupNorms have 32 groups, and their hint block the extension's 8x reduction.
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=4,
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    network = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.01)
    save_file(controlnet_to_ldm(network, unet.config), tmp_path / "control_tiny.safetensors")
    (tmp_path / "control_tiny.yaml").write_text(ORIGINAL_YAML)
    library = ControlNetLibrary(tmp_path)
    [model] = library.models()
    assert library.check("control_tiny", unet.config) == model  # its kind read from the file's shapes alone
    read = read_network(model, unet.config).state_dict()
    assert read.keys() == network.state_dict().keys()
    assert all(torch.equal(value, read[key]) for key, value in network.state_dict().items())

def test_the_control_map_is_fitted_to_each_size_by_the_resize_mode():
    picture = Image.fromarray(np.arange(96 * 64 * 3, dtype=np.uint32).reshape(64, 96, 3).astype(np.uint8))
    for mode in (0, 1, 2):
        cond = ControlUnit(torch.nn.Identity(), picture, resize_mode=mode).cond((32, 48), "cpu", torch.float32)
        expected = np.asarray((fit_map if mode == 2 else fit_image)(picture, 32, 48, mode), np.float32) / 255
        assert cond.shape == (1, 3, 48, 32)
        assert np.allclose(cond[0].permute(1, 2, 0).numpy(), expected)


# --- the engine ---------------------------------------------------------------------------------
def test_controlnet_changes_the_picture_and_is_exactly_off_at_weight_0_or_outside_its_window(cn_services):
    worker, engine = cn_services.worker, cn_services.engine
    plain = pixels(run(worker, {}))
    control = {"control_image": square()}
    steered = pixels(run(worker, controlnet_on(engine), **control))
    assert np.abs(steered - plain).mean() > 1
    for off in ({"controlnet_weight": 0.0}, {"controlnet_guidance_start": 1.0, "controlnet_guidance_end": 1.0}):
        with Calls(engine) as calls:
            assert np.array_equal(pixels(run(worker, controlnet_on(engine, **off), **control)), plain)
        assert calls.conds == [] and not any(calls.residuals)
    # A picture left in a closed ControlNet section changes nothing either.
    assert np.array_equal(pixels(run(worker, {}, **control)), plain)


def test_the_controlnet_steers_each_unet_call_within_its_window(cn_services):
    worker, engine = cn_services.worker, cn_services.engine
    with Calls(engine) as calls:
        run(worker, controlnet_on(engine, controlnet_guidance_start=0.5) | {"steps": 4, "batch_size": 2},
            control_image=square())
    # CFG runs 2 rows per image; the second half of 4 steps is 2 calls, each UNet call right after its ControlNet's.
    assert calls.conds == [((4, 3, 64, 64), 4)] * 2
    assert calls.residuals == [False, False, True, True]


def test_a_hypernetwork_bends_the_controlnets_attention_too(cn_services, tmp_path, monkeypatch):
    """A1111 bends every attention of its kind, the ControlNet's as well (the extension's layers are A1111's)."""
    from tests.test_hypernetworks import hooks_on, relu_file, write
    from webui.engine.hypernetworks import HypernetworkLibrary

    worker, engine = cn_services.worker, cn_services.engine
    write(tmp_path, "bend", relu_file())
    monkeypatch.setattr(engine, "hypernetworks", HypernetworkLibrary(tmp_path))
    network = engine.controlnets.network(engine.controlnets.find(CN), engine.pipe.unet.config, "cpu",
                                         torch.float32)  # the job's, cached
    seen = []
    handle = network.register_forward_pre_hook(lambda module, _args: seen.append(hooks_on(module)))
    try:
        run(worker, controlnet_on(engine) | {"prompt": "a house <hypernet:bend>"}, control_image=square())
    finally:
        handle.remove()
    attentions = sum(name.endswith(("attn1", "attn2")) for name, _ in network.named_modules())
    assert attentions and seen == [2 * attentions] * QUICK["steps"]  # a key and a value input each, every call
    assert hooks_on(network) == 0


def test_the_hires_pass_is_steered_at_its_own_size(cn_services):
    worker, engine = cn_services.worker, cn_services.engine
    with Calls(engine) as calls:
        run(worker, controlnet_on(engine) | {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6,
                                             "hr_second_pass_steps": 1}, control_image=noise_picture(2, 40, 30))
    assert [shape for shape, _rows in calls.conds] == [(2, 3, 64, 64)] * 2 + [(2, 3, 96, 96)]
    assert all(calls.residuals)


@pytest.mark.parametrize("masked", [False, True])
def test_img2img_and_inpainting_are_steered_at_their_size(cn_services, masked):
    worker, engine = cn_services.worker, cn_services.engine
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (16, 16, 48, 40))
    extra = {"mask": mask} if masked else {}
    with Calls(engine) as calls:
        job = run(worker, controlnet_on(engine, controlnet_module="invert") | {"denoising_strength": 1.0},
                  init_image=noise_picture(3, 96, 64), control_image=square(), **extra)
    assert job.images[0].image.size == (96, 64)
    assert [shape for shape, _rows in calls.conds] == [(2, 3, 64, 96)] * 2 and all(calls.residuals)


# --- the request ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, picture, message", [
    ({"controlnet_model": None}, True, "controlnet_model: pick a ControlNet model"),
    ({"controlnet_model": "no-such-cn"}, True, "controlnet_model: there is no ControlNet model 'no-such-cn'"),
    ({"controlnet_model": "sdxl-like-cn"}, True, "is a ControlNet for text embeddings 64 wide models, and the loaded "
                                                 "model is text embeddings 32 wide"),
    ({}, False, "controlnet_image: ControlNet is on but has no control picture"),
    ({"controlnet_guidance_start": 0.8, "controlnet_guidance_end": 0.2}, True, "controlnet_guidance_start: 0.8 comes "
                                                                               "after controlnet_guidance_end"),
    ({"controlnet_weight": 3}, True, "controlnet_weight: Input should be less than or equal to 2"),
    ({"controlnet_module": "depth_midas"}, True, "controlnet_module: 'depth_midas' is not here"),
    ({"controlnet_threshold_a": 0}, True, "controlnet_threshold_a: Input should be greater than or equal to 1"),
])
def test_what_controlnet_cannot_run_is_refused_at_submit_naming_the_field(cn_services, fields, picture, message):
    engine = cn_services.engine
    with pytest.raises(InvalidRequest) as refused:
        cn_services.worker.submit(QUICK | controlnet_on(engine, **fields),
                                  control_image=square() if picture else None)
    assert message in str(refused.value)


def test_controlnet_does_not_go_with_sd_upscale():
    with pytest.raises(ValueError, match="controlnet_enabled: SD upscale draws the picture in tiles"):
        GenerationRequest(controlnet_enabled=True, controlnet_model=CN, sd_upscale=True, init_image="0" * 40)


# --- the infotext -----------------------------------------------------------------------------------
def test_the_infotext_is_the_extensions_and_pastes_back(cn_services):
    engine = cn_services.engine
    fields = controlnet_on(engine, controlnet_weight=0.8, controlnet_resize_mode=2, controlnet_threshold_a=50,
                           controlnet_guidance_end=0.9)
    job = run(cn_services.worker, fields, control_image=square())
    text = job.images[0].infotext
    assert (f'ControlNet 0: "Module: canny, Model: {title(engine)}, Weight: 0.8, Resize Mode: Resize and Fill, '
            'Processor Res: 512, Threshold A: 50.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 0.9, '
            'Pixel Perfect: False, Control Mode: Balanced"') in text
    pasted = request_fields_from_infotext(text)
    request = job.request.model_dump()
    assert {name: value for name, value in pasted.items() if name.startswith("controlnet_")} == {
        name: request[name] for name in request if name.startswith("controlnet_") and name != "controlnet_image"}
    assert request_fields_from_infotext(run(cn_services.worker, {}).images[0].infotext)["controlnet_enabled"] is False


def test_a_pasted_unit_keeps_only_what_this_server_runs():
    fields = controlnet_fields({"ControlNet 0": "Module: depth_midas, Model: control_sd15_depth [fef5e48e], Weight: 1, "
                                                "Threshold A: 0.5, Threshold B: 0.5, Guidance End: x"})
    assert fields == {"controlnet_enabled": True, "controlnet_model": "control_sd15_depth [fef5e48e]",
                      "controlnet_weight": 1.0}


# --- the UI ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cn_ui(cn_services):
    from webui.ui.blocks import create_ui

    return create_ui(cn_services)


def ui_generate(tab, **controlnet):
    from webui.ui.session import Session

    return list(tab.actions.generate(Session(), "a house", "", "Euler a", "Automatic", 2, 5.0, 64, 64, 3, 1, 1, 1,
                                     TINY, **controlnet))


def test_both_tabs_have_the_controlnet_section_with_its_models(cn_ui, cn_engine):
    for tab in (cn_ui.txt2img, cn_ui.img2img):
        widgets = tab.widgets
        assert widgets["controlnet_enabled"].value is False  # off by default
        assert widgets["controlnet_model"].choices[0][0] == "None"
        assert title(cn_engine) in [choice[0] for choice in widgets["controlnet_model"].choices]
        assert [choice[0] for choice in widgets["controlnet_module"].choices] == ["none", "canny", "invert"]
        assert widgets["controlnet_resize_mode"].value == "Crop and Resize"


def test_the_ui_runs_controlnet_and_says_what_is_missing(cn_ui, cn_engine):
    results = ui_generate(cn_ui.txt2img, controlnet_enabled=True, controlnet_model=title(cn_engine),
                          controlnet_module="canny", controlnet_image=square(), controlnet_resize_mode=1)
    assert f"ControlNet 0: \"Module: canny, Model: {title(cn_engine)}" in results[-1][4]
    no_picture = ui_generate(cn_ui.txt2img, controlnet_enabled=True, controlnet_model=title(cn_engine))
    assert "ControlNet picture: ControlNet is on but has no control picture" in no_picture[-1][2]
    no_model = ui_generate(cn_ui.txt2img, controlnet_enabled=True, controlnet_model="None", controlnet_image=square())
    assert "ControlNet Model: pick a ControlNet model" in no_model[-1][2]
    with_a_script = ui_generate(cn_ui.txt2img, controlnet_enabled=True, controlnet_model=title(cn_engine),
                                controlnet_image=square(), prompt_list=True, prompt_lines="a\nb")
    assert "ControlNet runs with a plain Generate here" in with_a_script[-1][2]


def test_preview_shows_the_preprocessed_map_and_the_sliders_follow_the_preprocessor(cn_engine):
    from webui.ui.controlnet import ControlNetActions

    actions = ControlNetActions(cn_engine.controlnets)
    edges = actions.preview(square(), "canny", 64, 100, 200)
    assert np.array_equal(np.asarray(edges)[..., 0], canny(np.asarray(square()), 100, 200))
    assert np.array_equal(np.asarray(actions.preview(square(), "invert", 512, 1, 1)), 255 - np.asarray(square()))
    with pytest.raises(Exception, match="Upload a control picture first"):
        actions.preview(None, "canny", 512, 100, 200)
    assert [update["visible"] for update in actions.sliders_for("canny")] == [True] * 3
    assert [update["visible"] for update in actions.sliders_for("none")] == [False] * 3


def test_the_refresh_button_lists_a_model_dropped_in_since(cn_engine, cn_models):
    from webui.ui.controlnet import ControlNetActions

    actions = ControlNetActions(cn_engine.controlnets)
    extra = cn_models / "ControlNet" / "sub" / "late-cn.safetensors"
    extra.parent.mkdir()
    extra.write_bytes(b"not really weights")
    try:
        update = actions.refresh_models("gone [12345678]")
        assert any(choice.startswith("late-cn [") for choice in update["choices"]) and update["value"] == "None"
    finally:
        extra.unlink()


def test_pasted_parameters_set_the_controlnet_section(cn_ui, cn_engine):
    from webui.ui.params import widget_updates

    text = f'a house\nSteps: 2, Seed: 3, Size: 64x64, ControlNet 0: "Module: canny, Model: {title(cn_engine)}, ' \
           'Weight: 0.5, Resize Mode: Just Resize, Processor Res: 256, Threshold A: 50.0, Threshold B: 150.0, ' \
           'Guidance Start: 0.1, Guidance End: 0.7, Pixel Perfect: True, Control Mode: Balanced"'
    names = cn_ui.txt2img.field_names
    values = dict(zip(names, widget_updates(request_fields_from_infotext(text), names, [TINY], lambda *_: None,
                                            ["Automatic"], ["Latent"])))
    assert {name: values[name] for name in names if name.startswith("controlnet_")} == {
        "controlnet_enabled": True, "controlnet_module": "canny", "controlnet_model": title(cn_engine),
        "controlnet_weight": 0.5, "controlnet_guidance_start": 0.1, "controlnet_guidance_end": 0.7,
        "controlnet_resize_mode": "Just Resize", "controlnet_processor_res": 256, "controlnet_threshold_a": 50.0,
        "controlnet_threshold_b": 150.0, "controlnet_pixel_perfect": True}


# --- the API --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cn_client(cn_services):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    with TestClient(create_api_app(cn_services)) as client:
        yield client


def b64(picture: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unb64(data: str) -> Image.Image:
    import base64
    import io

    return Image.open(io.BytesIO(base64.b64decode(data)))


API_BODY = {"prompt": "a house", "steps": 2, "seed": 3, "cfg_scale": 5, "width": 64, "height": 64,
            "sampler_name": "Euler a"}


def test_the_api_runs_the_extensions_unit_on_txt2img_and_img2img(cn_client, cn_engine):
    plain = cn_client.post("/sdapi/v1/txt2img", json=API_BODY).json()
    unit = {"enabled": True, "image": b64(square()), "module": "canny", "model": title(cn_engine), "weight": 1,
            "guidance_start": 0, "guidance_end": 1, "threshold_a": -1, "threshold_b": 200, "resize_mode": 1,
            "processor_res": -1, "pixel_perfect": False, "control_mode": "Balanced"}
    scripts = {"alwayson_scripts": {"ControlNet": {"args": [unit, {"enabled": False}]}}}
    answer = cn_client.post("/sdapi/v1/txt2img", json=API_BODY | scripts)
    assert answer.status_code == 200, answer.text
    info = __import__("json").loads(answer.json()["info"])
    assert (f'ControlNet 0: "Module: canny, Model: {title(cn_engine)}, Weight: 1.0, Resize Mode: Crop and Resize, '
            'Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0') in info["infotexts"][0]
    assert not np.array_equal(np.asarray(unb64(answer.json()["images"][0])), np.asarray(unb64(plain["images"][0])))
    legacy = unit | {"input_image": unit["image"], "resize_mode": "Inner Fit (Scale to Fit)", "model": CN}
    del legacy["image"]
    img2img = cn_client.post("/sdapi/v1/img2img", json=API_BODY | {"init_images": [b64(noise_picture(4))],
                                                                   "alwayson_scripts": {"controlnet": {"args": [legacy]}}})
    assert img2img.status_code == 200, img2img.text
    assert "ControlNet 0" in __import__("json").loads(img2img.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("scripts, message", [
    ({"controlnet": {"args": [{"enabled": True, "model": "nope", "image": "x"}]}},
     "alwayson_scripts.controlnet.args[0].model: there is no ControlNet model 'nope'"),
    ({"controlnet": {"args": [{"enabled": True, "model": CN}]}},
     "alwayson_scripts.controlnet.args[0].image: send the control picture"),
    ({"controlnet": {"args": [{"enabled": True, "model": CN, "image": "x", "resize_mode": "Stretch"}]}},
     "alwayson_scripts.controlnet.args[0].resize_mode: 'Stretch' is no resize mode"),
    ({"controlnet": {"args": [{"enabled": True, "model": CN, "image": "x", "control_mode": 2}]}},
     "alwayson_scripts.controlnet.args[0].control_mode: only Balanced (0) is supported"),
    ({"controlnet": {"args": [{"enabled": True}, {"enabled": True}]}}, "2 units are enabled"),
    ({"controlnet": {"args": [{"enabled": True, "model": CN, "image": "x", "weight": 5}]}},
     "alwayson_scripts.controlnet.args[0].weight: Input should be less than or equal to 2"),
    ({"adetailer": {"args": []}}, "alwayson_scripts: no always-on script but ControlNet"),
])
def test_the_api_refuses_what_controlnet_cannot_run_naming_the_clients_field(cn_client, scripts, message):
    if "image" in str(scripts):
        for unit in scripts.get("controlnet", {}).get("args", []):
            unit["image"] = b64(square()) if unit.get("image") else unit.get("image")
    answer = cn_client.post("/sdapi/v1/txt2img", json=API_BODY | {"alwayson_scripts": scripts})
    assert answer.status_code in (404, 422) and message in answer.json()["detail"], answer.text


def test_a_unit_sent_without_enabled_is_off_as_in_the_extension_and_the_answer_says_so(cn_client):
    unit = {"image": b64(square()), "model": CN, "module": "canny"}
    answer = cn_client.post("/sdapi/v1/txt2img", json=API_BODY | {"alwayson_scripts": {"controlnet": {"args": [unit]}}})
    info = __import__("json").loads(answer.json()["info"])
    assert "ControlNet 0" not in info["infotexts"][0]
    assert any('not enabled (send "enabled": true)' in warning for warning in info["warnings"])


def test_the_extensions_routes_list_models_and_modules_and_detect(cn_client, cn_engine):
    assert cn_client.get("/controlnet/model_list").json() == {"model_list": cn_engine.controlnets.titles()}
    modules = cn_client.get("/controlnet/module_list").json()
    assert modules["module_list"] == ["none", "canny", "invert"]
    assert [slider["name"] for slider in modules["module_detail"]["canny"]["sliders"]] == [
        "Resolution", "Low Threshold", "High Threshold"]
    assert "invert (from white bg & black line)" in cn_client.get("/controlnet/module_list?alias_names=true").json()[
        "module_list"]
    detected = cn_client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [
        b64(square())], "controlnet_processor_res": 64, "controlnet_threshold_a": 100, "controlnet_threshold_b": 200})
    assert detected.status_code == 200 and detected.json()["info"] == "Success"
    edges = np.asarray(unb64(detected.json()["images"][0]).convert("L"))
    assert np.array_equal(edges, canny(np.asarray(square()), 100, 200))
    refused = cn_client.post("/controlnet/detect", json={"controlnet_module": "depth", "controlnet_input_images": []})
    assert refused.status_code == 422 and "'depth' is not available here" in refused.json()["detail"]
    empty = cn_client.post("/controlnet/detect", json={"controlnet_module": "canny"})
    assert empty.status_code == 422 and "no image selected" in empty.json()["detail"]


def test_the_controlnet_folder_follows_the_flags(tmp_path):
    from webui.config import parse_settings

    a1111 = tmp_path / "a1111" / "models"
    (a1111 / "Stable-diffusion").mkdir(parents=True)
    assert parse_settings(["--models-dir", str(a1111), "--outdir", str(tmp_path / "o")], {}).controlnet_folder == \
        a1111 / "ControlNet"
    chosen = parse_settings(["--controlnet-dir", str(tmp_path / "cn"), "--outdir", str(tmp_path / "o")], {})
    assert chosen.controlnet_folder == tmp_path / "cn"


# --- review: what the extension does that the first version did not ------------------------------------------
def test_a_long_thin_picture_gives_a_map_of_bounded_size(monkeypatch):
    """The preprocessor scales the short side to its resolution: a 4x2000 strip at 512 would be a 512x256000 map
    (131 megapixels, gigabytes in Canny's float arrays). The map stays within the pictures' pixel limit."""
    import webui.engine.controlnet as engine_cn

    monkeypatch.setattr(engine_cn, "MAX_MAP_PIXELS", 64 * 64)
    strip = noise_picture(5, 4, 2000)
    edges = detect_map(strip, "canny", 512)
    assert edges.width * edges.height <= 64 * 64 and edges.height > edges.width
    assert engine_cn.MAX_MAP_PIXELS == 64 * 64  # the patched limit is the one read
    monkeypatch.undo()
    assert engine_cn.MAX_MAP_PIXELS >= 2048 * 2048  # a square picture at the largest resolution is not limited
    assert detect_map(noise_picture(6, 40, 40), "canny", 80).size == (80, 80)


def test_resize_and_fill_fills_the_bars_with_the_maps_border_colour_not_stretched_edges():
    """The extension pads a map it fits inside with its border's median colour: stretching the edge columns (as
    img2img's Resize and fill does to a picture) would draw an edge that touches the side as a line across the
    bar."""
    edges = np.zeros((64, 32, 3), np.uint8)
    edges[20, :] = 255  # a line from side to side, touching both
    cond = ControlUnit(torch.nn.Identity(), Image.fromarray(edges), resize_mode=2).cond((128, 64), "cpu",
                                                                                      torch.float32)
    bars = torch.cat([cond[0, :, :, :40], cond[0, :, :, -40:]], dim=2)
    assert cond.shape == (1, 3, 64, 128) and bars.abs().max() == 0
    assert cond[0, :, 20, 48:80].min() > 0.5  # the map itself is there, in the middle




def test_a_transparent_control_picture_uploaded_on_the_page_is_read_as_the_apis_on_white(cn_ui, cn_services,
                                                                                         tmp_path):
    """Black strokes on a transparent layer: the API lays them on white (as the extension's HWC3 does); the page's
    picture must reach the worker with its transparency too, not made RGB by Gradio (black strokes on black)."""
    from gradio.components.image import ImageData

    strokes = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    strokes.paste((0, 0, 0, 255), (16, 16, 48, 24))
    strokes.save(tmp_path / "strokes.png")
    for tab in (cn_ui.txt2img, cn_ui.img2img):
        uploaded = tab.widgets["controlnet_image"].preprocess(ImageData(path=str(tmp_path / "strokes.png"),
                                                                        orig_name="strokes.png"))
        job = cn_services.worker.submit(QUICK | controlnet_on(cn_services.engine, controlnet_module="none"),
                                        control_image=uploaded)
        assert job.wait(120) and job.state is JobState.DONE, job.error
        read = np.asarray(job.control_map)
        assert read[0, 0].tolist() == [255] * 3 and read[20, 20].tolist() == [0] * 3
def test_img2img_with_no_control_picture_is_steered_by_its_own_picture_as_in_the_extension(cn_services,
                                                                                           cn_client):
    worker, engine = cn_services.worker, cn_services.engine
    start = noise_picture(8, 96, 64)
    with Calls(engine) as calls:
        job = run(worker, controlnet_on(engine) | {"denoising_strength": 0.75}, init_image=start)
    assert calls.conds and all(calls.residuals)
    assert np.array_equal(np.asarray(job.control_image), np.asarray(start))
    # txt2img still needs one
    with pytest.raises(InvalidRequest, match="controlnet_image: ControlNet is on but has no control picture"):
        worker.submit(QUICK | controlnet_on(engine))
    unit = {"enabled": True, "module": "canny", "model": CN}
    answer = cn_client.post("/sdapi/v1/img2img", json=API_BODY | {"init_images": [b64(start)],
                                                                  "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert answer.status_code == 200, answer.text
    assert "ControlNet 0" in __import__("json").loads(answer.json()["info"])["infotexts"][0]


def test_a_weights_file_holding_no_dict_is_refused_naming_it(tmp_path):
    from webui.engine.controlnet import ControlNetLibrary

    torch.save(torch.zeros(3), tmp_path / "odd.pt")  # loads under weights_only, but is no state dict
    with pytest.raises(ControlNetError, match="odd"):
        ControlNetLibrary(tmp_path).check("odd", tiny_components()["unet"].config)


def test_a_unit_may_name_its_preprocessor_by_the_extensions_label(cn_client):
    """The extension matches a unit's module by name or by label (module_list?alias_names=true lists labels)."""
    unit = {"enabled": True, "module": "invert (from white bg & black line)", "model": CN, "image": b64(square())}
    answer = cn_client.post("/sdapi/v1/txt2img", json=API_BODY | {"alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert answer.status_code == 200, answer.text
    assert 'ControlNet 0: "Module: invert' in __import__("json").loads(answer.json()["info"])["infotexts"][0]
