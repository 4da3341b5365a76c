"""Comments in prompts (A1111's "Enable comments" setting): `#` to the end of its line is not drawn, and not kept in
the infotext; the setting turns it off."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.helpers import finished_job
from webui.api import create_api_app
from webui.prompt_comments import strip_comments


@pytest.mark.parametrize("text, expected", [
    ("a cat # on a mat", "a cat"),
    ("# a note\na cat", "a cat"),
    ("a cat\n  # indented note\nby the sea", "a cat\nby the sea"),
    ("a cat, #1 fan", "a cat,"),
    ("no comment here", "no comment here"),
    ("a cat\n\nby the sea", "a cat\n\nby the sea"),  # empty lines are the user's, kept
    ("# all comment", ""),
])
def test_a_comment_runs_from_the_hash_to_the_end_of_its_line(text, expected):
    assert strip_comments(text) == expected


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    from tests.helpers import running_services

    yield from running_services(models_dir, tmp_path_factory.mktemp("comments") / "outputs")


QUICK = {"steps": 2, "seed": 21, "width": 64, "height": 64, "cfg_scale": 5.0}


def made(services, **fields):
    return finished_job(services, QUICK | fields).images[0]


def test_a_commented_prompt_draws_and_records_what_is_left(services):
    plain = made(services, prompt="a red apple", negative_prompt="blurry")
    commented = made(services, prompt="a red apple # try green next\n# lighting: soft",
                     negative_prompt="blurry #, dark")
    assert np.array_equal(np.asarray(commented.image), np.asarray(plain.image))
    assert commented.infotext == plain.infotext
    assert "#" not in commented.infotext


def test_with_the_setting_off_a_hash_is_text_like_any_other(services):
    with TestClient(create_api_app(services)) as client:
        assert client.post("/sdapi/v1/options", json={"enable_prompt_comments": False}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["enable_prompt_comments"] is False
    try:
        kept = made(services, prompt="a red apple # try green next")
        assert kept.infotext.startswith("a red apple # try green next\n")
        assert not np.array_equal(np.asarray(kept.image), np.asarray(made(services, prompt="a red apple").image))
    finally:
        services.options.update({"enable_prompt_comments": True})


def test_the_token_counter_leaves_comments_uncounted(services):
    from webui.ui.generation import GenerationActions
    from webui.ui.models import ModelActions

    actions = GenerationActions(services, ModelActions(services))
    assert actions.count_tokens("a red apple # and a very long note that would count many tokens") == \
        actions.count_tokens("a red apple")


def test_an_api_request_overrides_the_setting_for_itself_alone(services):
    body = {"prompt": "a red apple # try green next", "steps": 2, "width": 64, "height": 64, "seed": 5}
    with TestClient(create_api_app(services)) as client:
        kept = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"enable_prompt_comments": False}})
        stripped = client.post("/sdapi/v1/txt2img", json=body)
        bad = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"enable_prompt_comments": "maybe"}})
    # info's prompt is the one sent, as A1111's p.prompt; all_prompts and the infotext are what was drawn
    assert json.loads(kept.json()["info"])["all_prompts"] == ["a red apple # try green next"]
    assert json.loads(stripped.json()["info"])["all_prompts"] == ["a red apple"]  # the setting (on) for the next one
    assert json.loads(stripped.json()["info"])["prompt"] == "a red apple # try green next"
    assert bad.status_code == 422 and "override_settings.enable_prompt_comments" in bad.json()["detail"], bad.text
