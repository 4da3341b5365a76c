"""Resize seed from width/height (A1111's): the seed's noise drawn at another size and put in the middle, so a
picture keeps its composition when the size changes."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from tests.test_api import QUICK, client, services  # noqa: F401  (test_api's module fixtures, started again)
from webui.engine.noise import paste_middle, start_noise
from webui.prompt_lines import line_requests
from webui.schemas import GenerationRequest, InvalidRequest, parse_request
from webui.storage.infotext import request_fields_from_infotext


def a1111_paste(small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
    """stable-diffusion-webui's placement, as its create_random_tensors writes it."""
    result = large.clone()
    dx, dy = (large.shape[-1] - small.shape[-1]) // 2, (large.shape[-2] - small.shape[-2]) // 2
    w = small.shape[-1] if dx >= 0 else small.shape[-1] + 2 * dx
    h = small.shape[-2] if dy >= 0 else small.shape[-2] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    dx, dy = max(-dx, 0), max(-dy, 0)
    result[..., ty:ty + h, tx:tx + w] = small[..., dy:dy + h, dx:dx + w]
    return result


def test_the_seeds_noise_lands_where_a1111_puts_it():
    for sh, sw, lh, lw in itertools.product((3, 4, 7, 8, 12), repeat=4):
        small, large = torch.randn(1, 4, sh, sw), torch.randn(1, 4, lh, lw)
        assert torch.equal(paste_middle(small, large), a1111_paste(small, large)), (sh, sw, lh, lw)


def noise_of(seed: int, shape) -> torch.Tensor:
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


def test_the_middle_is_the_noise_a_run_at_the_other_size_starts_from():
    generators = [torch.Generator().manual_seed(seed) for seed in (5, 6)]
    noise = start_noise(generators, (4, 12, 16), torch.float32, from_shape=(4, 8, 8))
    for image, seed in enumerate((5, 6)):
        assert torch.equal(noise[image, :, 2:10, 4:12], noise_of(seed, (4, 8, 8))[0])  # as an 8x8 run's
        outside = noise_of(seed, (4, 12, 16))[0]
        assert torch.equal(noise[image, :, :2], outside[:, :2]) and torch.equal(noise[image, :, :, :4], outside[:, :, :4])
    # The generators are left where a plain run leaves them: the samplers' later draws are the same.
    assert torch.equal(torch.randn(3, generator=generators[0]), torch.randn(3, generator=_after((4, 12, 16), 5)))
    # A variation is drawn at that size too, and only the middle varies.
    varied = start_noise([torch.Generator().manual_seed(5)], (4, 12, 16), torch.float32, [40], 1.0, (4, 8, 8))
    assert torch.allclose(varied[0, :, 2:10, 4:12], noise_of(40, (4, 8, 8))[0], atol=1e-6)
    assert torch.equal(varied[0, :, :2], noise_of(5, (4, 12, 16))[0, :, :2])


def _after(shape, seed: int) -> torch.Generator:
    generator = torch.Generator().manual_seed(seed)
    torch.randn((1, *shape), generator=generator)
    return generator


def test_no_seed_resize_is_the_plain_noise():
    plain = start_noise([torch.Generator().manual_seed(9)], (4, 8, 8), torch.float32)
    assert torch.equal(plain[0], noise_of(9, (4, 8, 8))[0])


@pytest.mark.parametrize("fields, problem", [
    ({"seed_resize_from_w": 64}, "seed_resize_from_h: give it too, since seed_resize_from_w is set"),
    ({"seed_resize_from_h": 64}, "seed_resize_from_w: give it too, since seed_resize_from_h is set"),
    ({"seed_resize_from_w": 60, "seed_resize_from_h": 64}, "seed_resize_from_w: must be a multiple of 8 (0: off), "
                                                           "got 60; use 56 or 64"),
    ({"seed_resize_from_w": -8, "seed_resize_from_h": 64}, "seed_resize_from_w: Input should be greater than or"),
])
def test_a_seed_resize_is_checked_with_what_to_fix(fields, problem):
    with pytest.raises(InvalidRequest) as refused:
        parse_request({"prompt": "a fox"} | fields)
    assert problem in str(refused.value)


def test_a_prompt_list_line_may_resize_the_seed():
    [line] = line_requests({"prompt": "x"}, "--seed_resize_from_w 64 --seed_resize_from_h 48")
    assert (line["seed_resize_from_w"], line["seed_resize_from_h"]) == (64, 48)


def test_seed_resize_goes_into_the_infotext_and_back():
    text = "a fox\nSteps: 2, Sampler: Euler, Seed: 3, Size: 96x64, Seed resize from: 64x64"
    fields = request_fields_from_infotext(text)
    assert (fields["seed_resize_from_w"], fields["seed_resize_from_h"]) == (64, 64)
    fields = request_fields_from_infotext(text.replace(", Seed resize from: 64x64", ""))
    assert (fields["seed_resize_from_w"], fields["seed_resize_from_h"]) == (0, 0)  # left out: none
    fields = request_fields_from_infotext(text.replace("64x64", "500x300"))  # another tool's: as A1111 runs it
    assert (fields["seed_resize_from_w"], fields["seed_resize_from_h"]) == (496, 296)
    fields = request_fields_from_infotext(text.replace("64x64", "500x0"))
    assert (fields["seed_resize_from_w"], fields["seed_resize_from_h"]) == (0, 0)


def test_through_the_api_a_seed_resize_runs_and_comes_back(client):
    body = QUICK | {"seed": 4, "sampler_name": "Euler", "width": 96, "height": 64}
    plain = client.post("/sdapi/v1/txt2img", json=body).json()
    resized = [client.post("/sdapi/v1/txt2img", json=body | {"seed_resize_from_w": 64, "seed_resize_from_h": 64})
               .json() for _ in range(2)]
    info = json.loads(resized[0]["info"])
    assert "Size: 96x64, " in info["infotexts"][0] and ", Seed resize from: 64x64, " in info["infotexts"][0]
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (64, 64)
    assert resized[0]["images"] == resized[1]["images"] and resized[0]["images"] != plain["images"]
    assert json.loads(plain["info"])["seed_resize_from_w"] == -1  # A1111's "none"
    # As A1111 runs them: a side of 0 or less (its default, -1) is no seed resize, and a side is taken to a multiple
    # of 8 (A1111 draws the noise at side // 8).
    one_sided = client.post("/sdapi/v1/txt2img", json=body | {"seed_resize_from_w": 64}).json()
    assert one_sided["images"] == plain["images"]
    rounded = client.post("/sdapi/v1/txt2img", json=body | {"seed_resize_from_w": 70, "seed_resize_from_h": 71}).json()
    assert rounded["images"] == resized[0]["images"]


def test_a_request_names_the_size_its_seed_noise_is_drawn_at_or_none():
    request = GenerationRequest(prompt="x", width=64, height=64, seed_resize_from_w=64, seed_resize_from_h=64)
    assert request.seed_resize == (64, 64)
    assert GenerationRequest(prompt="x").seed_resize is None
