"""A1111's Emphasis mode setting: how (word:1.2) is read (Original, No norm, Ignore, None), checked against the text
encoder's own output weighted by hand; the Settings tab's option, a request's own, its infotext key and the API."""
from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from tests.helpers import finished_job
from webui.engine.prompts import _chunks, _weigh, encode_prompt_pair
from webui.storage.infotext import request_fields_from_infotext

WEIGHTED, PLAIN = "a (red:1.5) apple", "a red apple"
QUICK = {"steps": 2, "seed": 3, "width": 64, "height": 64}


def unweighted(pipe, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's output for the text's tokens as they are, and a weight per position (1.5 on "red")."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(text, padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(torch.tensor([ids]))[0]
    red = tokenizer("red", add_special_tokens=False).input_ids[0]
    weights = torch.tensor([[1.5 if token == red else 1.0 for token in ids]])
    return hidden, weights


@pytest.fixture
def leveled(engine):
    """The tiny text encoder with a bias on its last layer norm, as CLIP's has: its output then has a mean to keep
    (a fresh layer norm's is 0 to rounding)."""
    norm = engine.pipe.text_encoder.get_submodule("final_layer_norm")
    before = norm.bias.detach().clone()
    with torch.no_grad():
        norm.bias.copy_(torch.linspace(-0.3, 0.1, norm.bias.numel()))
    yield engine
    with torch.no_grad():
        norm.bias.copy_(before)


@pytest.mark.parametrize("mode", ["Original", "No norm"])
def test_weights_scale_the_token_and_original_restores_each_chunks_mean(leveled, mode):
    hidden, weights = unweighted(leveled.pipe, PLAIN)
    assert abs(float(hidden.mean())) > 0.05  # a level to keep
    expected = hidden * weights[..., None]
    if mode == "Original":
        expected = expected * (hidden.mean() / expected.mean())
    with torch.no_grad():
        ours = encode_prompt_pair(leveled.pipe, [WEIGHTED], [], emphasis=mode)[0]
    assert torch.allclose(ours, expected, atol=1e-5)


def test_a_chunk_without_a_mean_is_weighted_not_blown_up(engine):
    """The tiny encoder's fresh layer norm gives chunks a mean of ~0: A1111's division by it made inf embeddings (and
    a NaN picture); the chunk is weighted as No norm weighs it instead."""
    hidden, weights = unweighted(engine.pipe, PLAIN)
    assert abs(float(hidden.mean())) < 1e-6
    with torch.no_grad():
        original = encode_prompt_pair(engine.pipe, [WEIGHTED], [], emphasis="Original")[0]
        no_norm = encode_prompt_pair(engine.pipe, [WEIGHTED], [], emphasis="No norm")[0]
    assert torch.isfinite(original).all() and torch.equal(original, no_norm)
    assert torch.allclose(original, hidden * weights[..., None], atol=1e-5)


def test_a_chunk_that_had_no_mean_is_not_scaled_to_nothing():
    """Its old mean of ~0 over a weighted mean would zero it: it is weighted alone too."""
    hidden = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])  # mean 0, values of size 1.5
    weights = torch.tensor([[1.0, 1.5]])
    assert torch.equal(_weigh(hidden, weights), hidden * weights[..., None])
    leveled = hidden + 0.5  # a mean to keep: A1111's rescale
    weighted = leveled * weights[..., None]
    torch.testing.assert_close(_weigh(leveled, weights), weighted * (leveled.mean() / weighted.mean()))


def test_ignore_reads_the_brackets_and_weighs_nothing(engine):
    with torch.no_grad():
        ignored = encode_prompt_pair(engine.pipe, [WEIGHTED], [], emphasis="Ignore")[0]
        plain = encode_prompt_pair(engine.pipe, [PLAIN], [])[0]
    assert torch.equal(ignored, plain)


def test_none_reads_brackets_and_break_as_text(engine):
    tokenizer = engine.pipe.tokenizer
    [(ids, weights)] = _chunks(tokenizer, WEIGHTED, "None")
    assert ids == tokenizer(WEIGHTED, padding="max_length", max_length=77).input_ids and set(weights) == {1.0}
    assert len(_chunks(tokenizer, "a cat BREAK a dog", "None")) == 1
    assert len(_chunks(tokenizer, "a cat BREAK a dog")) == 2


def test_the_settings_mode_is_used_written_and_read_back(services):
    services.options.update({"emphasis": "No norm"})
    weighted = finished_job(services, QUICK | {"prompt": WEIGHTED})
    plain = finished_job(services, QUICK | {"prompt": PLAIN})
    own = finished_job(services, QUICK | {"prompt": WEIGHTED, "emphasis": "Ignore"})  # a request's own wins
    infotext = weighted.images[0].infotext
    assert "Emphasis: No norm" in infotext and request_fields_from_infotext(infotext)["emphasis"] == "No norm"
    assert "Emphasis" not in plain.images[0].infotext  # no brackets: nothing it changed, as A1111 leaves it out
    assert "Emphasis: Ignore" in own.images[0].infotext
    assert weighted.images[0].image.tobytes() != own.images[0].image.tobytes()


def test_the_api_takes_override_settings_an_infotext_and_post_options(services):
    from webui.api import create_api_app

    body = QUICK | {"prompt": WEIGHTED}
    with TestClient(create_api_app(services)) as client:
        overridden = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"emphasis": "Ignore"}})
        pasted_line = f"{WEIGHTED}\nSteps: 2, Sampler: Euler, Seed: 3, Size: 64x64, Emphasis: None"
        pasted = client.post("/sdapi/v1/txt2img", json=body | {"infotext": pasted_line})
        bad = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"emphasis": "loud"}})
        saved = client.post("/sdapi/v1/options", json={"emphasis": "No norm"})
        options = client.get("/sdapi/v1/options").json()
    infotexts = [json.loads(answer.json()["info"])["infotexts"][0] for answer in (overridden, pasted)]
    assert "Emphasis: Ignore" in infotexts[0] and "Emphasis: None" in infotexts[1]
    assert bad.status_code == 422 and "override_settings.emphasis" in bad.text
    assert saved.status_code == 200 and options["emphasis"] == "No norm"


def test_the_chunk_counts_behind_pad_conds_follow_the_mode(engine):
    from webui.schemas import GenerationRequest

    request = GenerationRequest(prompt="a cat BREAK a dog", steps=2)  # two chunks, the negative prompt one
    assert engine.pads_prompts(request)
    assert not engine.pads_prompts(request.model_copy(update={"emphasis": "None"}))  # BREAK is a word: one chunk
