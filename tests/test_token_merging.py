"""A1111's Token merging (webui/engine/token_merging.py): the merge and unmerge against a plain computation, then runs
of tiny models with attention at the full latent size (SD 1.x's layout; the usual tiny model has none there, so it
merges nothing, as SDXL in A1111): pictures, the hooks' lifetime, the hires fix's own ratio, a refiner and a hires
checkpoint that take over, the infotext and its paste, the page, the API's override_settings and the X/Y/Z axes."""
from __future__ import annotations

import base64
import io
import itertools
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import TINY
from tests.helpers import finished_job, fingerprint, noise_picture, running_services
from tests.tiny_sd import save_tiny_model
from webui.engine.token_merging import merged_tokens, plan_merge
from webui.schemas import GenerationRequest, InvalidRequest, parse_request
from webui.storage.infotext import request_fields_from_infotext

FULL = "tiny-full-size"  # attention at the full latent size, where tokens merge
OTHER = "tiny-full-size-2"  # the same layout, other weights: the refiner or hires checkpoint
QUICK = {"prompt": "a red apple", "steps": 3, "seed": 21, "sampler_name": "Euler", "width": 64, "height": 64,
         "model": FULL}
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.6}


# --- the maths -------------------------------------------------------------------------------------
def plain_merge_result(tokens: torch.Tensor, height: int, width: int, r: int) -> torch.Tensor:
    """What every token holds after merge then unmerge, worked out token by token: the destinations are the top-left
    token of each whole 2x2 cell; the r sources whose best cosine similarity to a destination is highest are averaged
    with the other tokens going to that destination, and take that average; the rest keep their own values."""
    rows = [tokens[i] for i in range(height * width)]
    destinations = [row * width + col for row in range(0, height - height % 2, 2)
                    for col in range(0, width - width % 2, 2)]
    sources = [i for i in range(height * width) if i not in destinations]

    def cosine(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    best = {}
    for source in sources:
        likeness = [cosine(rows[source], rows[d]) for d in destinations]
        best[source] = (max(likeness), destinations[likeness.index(max(likeness))])
    merged = sorted(sources, key=lambda s: -best[s][0])[:r]
    groups = {d: [d] + [s for s in merged if best[s][1] == d] for d in destinations}
    result = [row.clone() for row in rows]
    for members in groups.values():
        average = sum(rows[m] for m in members) / len(members)
        for member in members:
            result[member] = average
    return torch.stack(result)


def test_merge_then_unmerge_matches_a_token_by_token_computation():
    torch.manual_seed(0)
    for height, width, ratio in ((4, 4, 0.5), (5, 7, 0.3), (6, 4, 0.9)):
        tokens = torch.randn(height * width, 6, dtype=torch.float64)
        plan = plan_merge(tokens[None], height, width, ratio)
        sources = height * width - (height // 2) * (width // 2)
        r = min(int(ratio * height * width), sources)  # at most every source
        merged = plan.merge(tokens[None])
        assert merged.shape == (1, height * width - r, 6)  # r tokens fewer
        assert torch.allclose(plan.unmerge(merged)[0], plain_merge_result(tokens, height, width, r))


def test_each_row_of_a_batch_merges_by_its_own_tokens():
    torch.manual_seed(1)
    tokens = torch.randn(3, 16, 4, dtype=torch.float64)
    plan = plan_merge(tokens, 4, 4, 0.5)
    for row in range(3):
        assert torch.allclose(plan.unmerge(plan.merge(tokens))[row], plain_merge_result(tokens[row], 4, 4, 8))


def test_the_destinations_are_fixed_top_left_corners_odd_edges_are_sources_and_nothing_is_drawn():
    tokens = torch.randn(1, 35, 4)
    before = torch.random.get_rng_state()
    plan, again = plan_merge(tokens, 5, 7, 0.5), plan_merge(tokens, 5, 7, 0.5)
    assert torch.equal(torch.random.get_rng_state(), before)  # no random draw: a seed gives its picture again
    assert plan.destinations.tolist() == [0, 2, 4, 14, 16, 18]  # rows 0 and 2, columns 0, 2 and 4 of 5x7
    for part in ("destinations", "kept", "merged", "into"):
        assert torch.equal(getattr(plan, part), getattr(again, part))


def test_identical_tokens_come_back_as_they_were():
    tokens = torch.full((2, 64, 8), 0.25)
    plan = plan_merge(tokens, 8, 8, 0.5)
    merged = plan.merge(tokens)
    assert merged.shape == (2, 32, 8) and torch.equal(plan.unmerge(merged), tokens)


def test_ratio_0_or_too_few_tokens_merge_nothing_and_a_ratio_out_of_range_is_refused():
    assert plan_merge(torch.randn(1, 16, 4), 4, 4, 0) is None
    assert plan_merge(torch.randn(1, 4, 4), 2, 2, 0.2) is None  # int(0.2 x 4) = 0
    with pytest.raises(ValueError, match="from 0 .off. to 0.9, got 0.95"):
        plan_merge(torch.randn(1, 16, 4), 4, 4, 0.95)


def test_the_unet_hooks_merge_only_at_the_full_latent_size_and_leave_nothing_behind():
    from tests.tiny_sd import make_tiny_pipeline

    for full_size, merged_calls in ((True, 3), (False, 0)):
        unet = make_tiny_pipeline(full_size_attention=full_size).unet
        sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
        with torch.no_grad():
            plain = unet(sample, 500, context).sample
            with merged_tokens(unet, 0) as calls:
                assert torch.equal(unet(sample, 500, context).sample, plain) and calls.count == 0
            with merged_tokens(unet, 0.5) as calls:
                merged = unet(sample, 500, context).sample
            assert calls.count == merged_calls  # the down block's one layer and the up block's two
            assert torch.equal(unet(sample, 500, context).sample, plain)
        assert not torch.equal(merged, plain) if full_size else torch.equal(merged, plain)
        assert all(not module._forward_hooks and not module._forward_pre_hooks for module in unet.modules())


# --- runs --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("token-merging-models")
    save_tiny_model(folder / TINY)
    save_tiny_model(folder / FULL, full_size_attention=True)
    save_tiny_model(folder / OTHER, seed=1, full_size_attention=True)
    return folder


@pytest.fixture(scope="module")
def services(models, tmp_path_factory):
    yield from running_services(models, tmp_path_factory.mktemp("token-merging-out"), ckpt=FULL)


def run(services, init_image=None, **fields):
    return finished_job(services, QUICK | fields, init_image=init_image)


def pixels(job):
    return np.asarray(job.images[0].image, np.int16)


def test_a_ratio_changes_the_picture_and_the_same_seed_gives_it_again(services):
    plain, merged, again = run(services), run(services, token_merging_ratio=0.5), run(services, token_merging_ratio=0.5)
    assert np.abs(pixels(merged) - pixels(plain)).max() > 0
    assert np.array_equal(pixels(merged), pixels(again))
    picture = noise_picture(4)
    img2img = [pixels(run(services, init_image=picture, token_merging_ratio=ratio)) for ratio in (0, 0.5)]
    assert np.abs(img2img[0] - img2img[1]).max() > 0


def test_a_model_without_attention_at_the_full_latent_size_merges_nothing(services):
    """As A1111 with SDXL: the ratio is written, and nothing changes."""
    plain, merged = run(services, model=TINY), run(services, model=TINY, token_merging_ratio=0.5)
    assert np.array_equal(pixels(plain), pixels(merged))
    assert "Token merging ratio: 0.5" in merged.images[0].infotext


def hook_count(unet) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in unet.modules())


def test_the_hooks_are_gone_after_a_run_and_after_one_cut_short(services):
    from webui.engine.generate import DenoisingStopped

    def check(engine):
        unet = engine.pipe.unet
        before, during = hook_count(unet), []

        def stop_after_one(step, steps, latents):
            during.append(hook_count(unet))
            if step >= 1:
                raise DenoisingStopped()

        request = GenerationRequest(**QUICK | {"token_merging_ratio": 0.5})
        engine.generate(request, [1], on_step=lambda *args: during.append(hook_count(unet)))
        finished = hook_count(unet)
        with pytest.raises(DenoisingStopped):
            engine.generate(request, [1], on_step=stop_after_one)
        return before, during, finished, hook_count(unet)

    before, during, finished, stopped = services.worker.call(check).result(120)
    assert min(during) > before  # they were on while it ran
    assert finished == stopped == before


def test_the_hires_pass_merges_at_its_own_ratio_or_else_the_first_passs(services):
    def picture(ratio, ratio_hr):
        return pixels(run(services, **HIRES, token_merging_ratio=ratio, token_merging_ratio_hr=ratio_hr))

    assert np.abs(picture(0, 0.5) - picture(0, 0)).max() > 0  # the second pass alone merges
    assert np.array_equal(picture(0.5, 0), picture(0.5, 0.5))  # 0: as the first pass


@pytest.fixture
def unet_calls(models, monkeypatch):
    """Each UNet call as {"model": its name, "tokens": [the token count of each self-attention call in it]}."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    names = {fingerprint(UNet2DConditionModel.from_pretrained(models / name / "unet")): name for name in (FULL, OTHER)}
    calls, inside = [], []
    unet_forward, attention_forward = UNet2DConditionModel.forward, Attention.forward

    def unet_spy(self, *args, **kwargs):
        inside.append({"model": names.get(fingerprint(self), "?"), "tokens": []})
        calls.append(inside[-1])
        try:
            return unet_forward(self, *args, **kwargs)
        finally:
            inside.pop()

    def attention_spy(self, hidden_states, *args, **kwargs):
        if inside and kwargs.get("encoder_hidden_states") is None:
            inside[-1]["tokens"].append(hidden_states.shape[1])
        return attention_forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", unet_spy)
    monkeypatch.setattr(Attention, "forward", attention_spy)
    return calls


def test_a_refiner_that_takes_over_merges_too(services, unet_calls):
    run(services, steps=4, refiner_checkpoint=OTHER, refiner_switch_at=0.5, token_merging_ratio=0.5)
    assert {call["model"] for call in unet_calls} == {FULL, OTHER}
    # 64x64 pixels: 32x32 latent tokens (the tiny VAE halves the size), 512 of them after merging; the mid block's
    # 16x16 never merges
    assert all(512 in call["tokens"] and 1024 not in call["tokens"] for call in unet_calls)
    unet_calls.clear()
    run(services, steps=4, refiner_checkpoint=OTHER, refiner_switch_at=0.5)
    assert all(1024 in call["tokens"] and 512 not in call["tokens"] for call in unet_calls)


def test_a_hires_checkpoint_that_takes_over_merges_at_the_hires_ratio(services, unet_calls):
    run(services, **HIRES, hr_checkpoint_name=OTHER, token_merging_ratio_hr=0.5)
    first, second = ([call for call in unet_calls if call["model"] == name] for name in (FULL, OTHER))
    assert first and second
    assert all(1024 in call["tokens"] for call in first)  # the first pass does not merge
    assert all(1152 in call["tokens"] and 2304 not in call["tokens"] for call in second)  # 96x96: 48x48 tokens


# --- the infotext, the page, the API, the X/Y/Z plot ----------------------------------------------------------
def test_the_infotext_says_the_ratios_as_a1111_and_reads_them_back(services):
    plain = run(services).images[0].infotext
    merged = run(services, token_merging_ratio=0.3).images[0].infotext
    hires = run(services, **HIRES, token_merging_ratio=0.3).images[0].infotext
    own = run(services, **HIRES, token_merging_ratio_hr=0.6).images[0].infotext
    assert "Token merging" not in plain
    assert "Token merging ratio: 0.3" in merged and "Token merging ratio hr" not in merged
    assert "Token merging ratio: 0.3, Token merging ratio hr: 0.3" in hires  # the hires pass's, which is the first's
    assert "Token merging ratio hr: 0.6" in own and "Token merging ratio: " not in own
    assert request_fields_from_infotext(plain)["token_merging_ratio"] == 0  # written at 0: left out
    assert request_fields_from_infotext(merged)["token_merging_ratio"] == 0.3
    assert request_fields_from_infotext(own)["token_merging_ratio_hr"] == 0.6
    # A1111's own text pastes as well
    a1111 = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Token merging ratio: 0.4"
    assert request_fields_from_infotext(a1111)["token_merging_ratio"] == 0.4


def test_a_ratio_out_of_range_is_refused_saying_what_to_use(services):
    for field, value in itertools.product(("token_merging_ratio", "token_merging_ratio_hr"), (0.95, -1)):
        with pytest.raises(InvalidRequest, match=rf"^{field}: must be from 0 \(off\) to 0.9, got {value:g}$"):
            parse_request({field: value})
        with pytest.raises(InvalidRequest, match=f"{field}: must be from 0"):
            services.worker.submit(QUICK | {field: value})


@pytest.fixture(scope="module")
def ui(services):
    from webui.ui.blocks import create_ui

    return create_ui(services)


def test_the_tabs_run_their_ratio_and_a_paste_sets_it(ui):
    from webui.ui.generation import Session
    from webui.ui.params import IMG2IMG_FIELDS, TXT2IMG_FIELDS

    txt2img, img2img = ui.txt2img, ui.img2img
    assert txt2img.widgets["token_merging_ratio"].elem_id == "txt2img_token_merging_ratio"
    assert txt2img.widgets["token_merging_ratio_hr"].elem_id == "txt2img_token_merging_ratio_hr"
    assert img2img.widgets["token_merging_ratio"].elem_id == "img2img_token_merging_ratio"
    assert "token_merging_ratio_hr" not in img2img.widgets  # no hires fix there
    session = Session()
    *_, last = txt2img.actions.generate(session, "a red apple", steps=2, width=64, height=64, seed=3, model=FULL,
                                        token_merging_ratio=0.4, enable_hr=True, hr_scale=1.5,
                                        token_merging_ratio_hr=0.7)
    text = last[4]
    assert "Token merging ratio: 0.4, Token merging ratio hr: 0.7" in text, last[2]
    sent = dict(zip(TXT2IMG_FIELDS, ui_event(ui, "send_from_pnginfo")(text)))
    assert (sent["token_merging_ratio"], sent["token_merging_ratio_hr"]) == (0.4, 0.7)
    pasted = dict(zip(IMG2IMG_FIELDS, ui_event(ui, "paste_into_img2img")(text, Session())[:-1]))
    assert pasted["token_merging_ratio"] == 0.4
    plain = dict(zip(TXT2IMG_FIELDS, ui_event(ui, "send_from_pnginfo")(text.replace(
        ", Token merging ratio: 0.4, Token merging ratio hr: 0.7", ""))))
    assert (plain["token_merging_ratio"], plain["token_merging_ratio_hr"]) == (0, 0)  # made without: back to off


def ui_event(ui, name: str):
    for block_fn in ui.blocks.fns.values():
        if block_fn.api_name == name or getattr(block_fn.fn, "__name__", None) == name:
            return block_fn.fn
    raise KeyError(name)


@pytest.fixture(scope="module")
def client(services):
    from webui.api import create_api_app

    with TestClient(create_api_app(services)) as test_client:
        yield test_client


API = {"prompt": "a red apple", "steps": 2, "seed": 5, "width": 64, "height": 64, "sampler_name": "Euler",
       "override_settings": {"sd_model_checkpoint": FULL}}


def info_of(response) -> str:
    assert response.status_code == 200, response.text[:400]
    return response.json()["info"]


def test_the_api_takes_a1111s_override_settings(client):
    def txt2img(**settings):
        return client.post("/sdapi/v1/txt2img", json=API | {"override_settings": API["override_settings"] | settings})

    def img2img(**settings):
        buffer = io.BytesIO()
        noise_picture(6).save(buffer, format="PNG")
        body = API | {"init_images": [base64.b64encode(buffer.getvalue()).decode()]}
        return client.post("/sdapi/v1/img2img", json=body | {"override_settings": API["override_settings"] | settings})

    assert "Token merging" not in info_of(txt2img())
    assert "Token merging ratio: 0.5" in info_of(txt2img(token_merging_ratio=0.5))
    hires = client.post("/sdapi/v1/txt2img", json=API | HIRES | {"override_settings": API["override_settings"] | {
        "token_merging_ratio_hr": 0.6}})
    assert "Token merging ratio hr: 0.6" in info_of(hires)
    # img2img: its own option where token_merging_ratio is 0, as A1111
    assert "Token merging ratio: 0.4" in info_of(img2img(token_merging_ratio_img2img=0.4))
    assert "Token merging ratio: 0.2" in info_of(img2img(token_merging_ratio=0.2, token_merging_ratio_img2img=0.4))
    assert "Token merging" not in info_of(txt2img(token_merging_ratio_img2img=0.4))
    pasted = client.post("/sdapi/v1/txt2img", json=API | {"infotext": "a\nSteps: 2, Sampler: Euler, Seed: 5, Size: "
                                                                        "64x64, Token merging ratio: 0.3"})
    assert "Token merging ratio: 0.3" in info_of(pasted)
    for settings, field in (({"token_merging_ratio": 0.95}, "token_merging_ratio"),
                            ({"token_merging_ratio_hr": -1}, "token_merging_ratio_hr")):
        refused = txt2img(**settings)
        assert refused.status_code == 422
        assert f"override_settings.{field}: must be from 0 (off) to 0.9" in refused.json()["detail"], refused.text
    refused = img2img(token_merging_ratio_img2img=2)
    assert refused.status_code == 422
    assert "override_settings.token_merging_ratio_img2img: must be from 0 (off) to 0.9, got 2" in refused.json()[
        "detail"]


def test_post_options_sets_the_ratios_of_api_requests_that_give_none(services):
    from webui.api import create_api_app

    with TestClient(create_api_app(services)) as client:  # its own: the options stay with this app
        refused = client.post("/sdapi/v1/options", json={"token_merging_ratio_img2img": 1.5})
        huge = client.post("/sdapi/v1/options", json={"token_merging_ratio": 10 ** 400})  # beyond any float
        set_ = client.post("/sdapi/v1/options", json={"token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.6})
        options = client.get("/sdapi/v1/options").json()
        by_option = info_of(client.post("/sdapi/v1/txt2img", json=API | HIRES))
        own = info_of(client.post("/sdapi/v1/txt2img", json=API | {"override_settings": API["override_settings"] | {
            "token_merging_ratio": 0.2}}))
        pasted = info_of(client.post("/sdapi/v1/txt2img", json=API | {"infotext": "a\nSteps: 2, Sampler: Euler, Seed: "
                                                                                  "5, Size: 64x64"}))
    assert refused.status_code == 422 and "token_merging_ratio_img2img: must be from 0 (off) to 0.9" in refused.text
    assert huge.status_code == 422 and "token_merging_ratio: must be from 0 (off) to 0.9, got a number of 401 digits" \
        in huge.text
    assert set_.status_code == 200 and (options["token_merging_ratio"], options["token_merging_ratio_hr"],
                                        options["token_merging_ratio_img2img"]) == (0.5, 0.6, 0.0)
    assert "Token merging ratio: 0.5" in by_option and "Token merging ratio hr: 0.6" in by_option
    assert "Token merging ratio: 0.2" in own
    assert "Token merging ratio: 0.5" in pasted  # an infotext without the key leaves the option standing, as A1111


def test_the_xyz_plot_has_a1111s_two_axes(client):
    from webui.api.scripts import a1111_axes
    from webui.xyz_plot import plan, read_axis

    axes = [read_axis("X", "Token merging ratio", "0, 0.5"), read_axis("Y", "Token merging ratio high-res", "0.3"),
            read_axis("Z", "Nothing", "")]
    cells = plan(GenerationRequest(**QUICK | HIRES).model_dump(), axes).cells
    assert [(c.request["token_merging_ratio"], c.request["token_merging_ratio_hr"]) for c in cells] == [
        (0, 0.3), (0.5, 0.3)]
    with pytest.raises(InvalidRequest, match="X value 'Token merging ratio: 1', .*: token_merging_ratio: must be fr"):
        plan(QUICK, [read_axis("X", "Token merging ratio", "0.5, 1"), *axes[1:]])
    index = a1111_axes("txt2img").index("Token merging ratio")  # by A1111's index, over the API
    body = API | {"script_name": "x/y/z plot", "script_args": [index, "0, 0.5"]}
    infotexts = json.loads(info_of(client.post("/sdapi/v1/txt2img", json=body)))["infotexts"]
    assert "Token merging" not in infotexts[1] and "Token merging ratio: 0.5" in infotexts[2]
