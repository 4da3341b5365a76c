"""A1111's prompt editing ([from:to:when]) and alternation ([a|b]): the schedule of texts, and the engine
feeding the UNet each step's text."""
import numpy as np
import pytest
import torch

from webui.engine.prompt_schedule import phase_at, prompt_phases
from webui.engine.prompts import encode_prompt_pair
from webui.schemas import GenerationRequest


def phases(prompt: str, steps: int, negative: str = "") -> list[tuple]:
    return [(phase.last_step, phase.prompt, phase.negative) for phase in prompt_phases(prompt, negative, steps)]


def texts_per_step(prompt: str, steps: int) -> list[str]:
    schedule = prompt_phases(prompt, "", steps)
    return [schedule[phase_at(schedule, step)].prompt for step in range(steps)]


@pytest.mark.parametrize("prompt, expected", [
    ("a [cat:dog:0.5] b", [(10, "a cat b", ""), (20, "a dog b", "")]),  # a fraction of the steps
    ("a [cat:dog:10] b", [(10, "a cat b", ""), (20, "a dog b", "")]),  # a step number
    ("[cat:dog: 5 ]", [(5, "cat", ""), (20, "dog", "")]),
    ("[dog:0.25]", [(5, "", ""), (20, "dog", "")]),  # added at a step
    ("[cat::3]", [(3, "cat", ""), (20, "", "")]),  # removed after a step
    ("[cat:dog:0]", [(20, "dog", "")]),
    ("[cat:dog:-2]", [(20, "dog", "")]),
    ("[cat:dog:30]", [(20, "cat", "")]),  # past the last step: never switches
    ("[cat:dog:1.0]", [(20, "cat", "")]),  # 1.0 is all of the steps, 1 the first step
    ("[cat:dog:1]", [(1, "cat", ""), (20, "dog", "")]),
    ("[cat:dog:1e999]", [(20, "cat", "")]),
    ("(a [cat:dog:0.5]:1.2)", [(10, "(a cat:1.2)", ""), (20, "(a dog:1.2)", "")]),  # inside a weight
    ("[[cat:dog:5]:bird:15]", [(5, "cat", ""), (15, "dog", ""), (20, "bird", "")]),  # nested
])
def test_prompt_editing_switches_at_the_step_a1111_switches(prompt, expected):
    assert phases(prompt, 20) == expected


@pytest.mark.parametrize("prompt", [
    "a [cat] b", "[cat:dog]", "[cat:dog:soon]", "[a|b:0.5]", "[a:b:c:0.5]", "\\[cat:dog:3\\]", "[cat:dog:0.5",
    "(cat:dog:0.5)", "]cat[", "a\\", "[cat:dog:５]",  # A1111's numbers are ASCII digits
    # A "|" outside an alternation is past A1111's grammar: it reads the whole prompt as text, edits included.
    "{red|blue} hair, [cat:dog:0.5]", "(red|blue) hair, [cat:dog:5]", "a | b [cat:dog:5]", "[a|b:0.5] [cat:dog:5]",
])
def test_what_is_not_an_edit_stays_as_written(prompt):
    assert phases(prompt, 20) == [(20, prompt, "")]


def test_steps_are_counted_from_0_and_the_text_before_reaches_its_step():
    """As in A1111: [cat:dog:2] reads cat at steps 0, 1 and 2."""
    assert texts_per_step("[cat:dog:2]", 5) == ["cat", "cat", "cat", "dog", "dog"]


def test_alternation_takes_another_option_each_step_as_a1111_does():
    # A1111 reads the first option for steps 0 and 1, then alternates; a prompt from its infotext matches.
    assert texts_per_step("a [cat|dog] b", 5) == ["a cat b", "a cat b", "a dog b", "a cat b", "a dog b"]
    assert texts_per_step("[cat|dog|]", 4) == ["cat", "cat", "dog", ""]
    assert texts_per_step("[[cat:dog:2]|bird]", 4) == ["cat", "cat", "bird", "dog"]


def test_the_negative_prompt_is_scheduled_too():
    assert phases("cat", 10, negative="[blurry::0.5], dark") == [(5, "cat", "blurry, dark"), (10, "cat", ", dark")]
    assert phases("[cat:dog:3]", 10, negative="[blurry::6]") == [
        (3, "cat", "blurry"), (6, "dog", "blurry"), (10, "dog", "")]


def test_steps_past_the_schedule_read_the_last_phase():
    """Heun and DPM2 call the model more often than there are steps."""
    schedule = prompt_phases("[cat:dog:2]", "", 4)
    assert schedule[phase_at(schedule, 7)].prompt == "dog"


def old_phases(prompt: str, steps: int, first_pass_steps: int | None = None) -> list[tuple]:
    return [(phase.last_step, phase.prompt) for phase in prompt_phases(prompt, "", steps, first_pass_steps, True)]


@pytest.mark.parametrize("prompt, expected", [
    ("[cat:dog:0.5]", [(10, "cat"), (20, "dog")]),  # below 1: a fraction, as now
    ("[cat:dog:5]", [(5, "cat"), (20, "dog")]),
    ("[cat:dog:1.0]", [(1, "cat"), (20, "dog")]),  # not below 1: step 1, where now it is all the steps
    ("[cat:dog:5.0]", [(5, "cat"), (20, "dog")]),  # now: 5 times the steps, never switching
    ("[cat:dog:7.9]", [(7, "cat"), (20, "dog")]),
])
def test_a1111s_old_timelines_read_below_1_as_a_fraction_and_the_rest_as_steps(prompt, expected):
    """A1111's get_learned_conditioning_prompt_schedules with use_old_scheduling."""
    assert old_phases(prompt, 20) == expected


def test_on_a1111s_old_timelines_the_hires_pass_reads_on_the_first_passs_clock():
    # a first pass of 20 steps, then 10: the hires texts are timed as the first pass's were
    assert old_phases("a [b:c:0.5]", 10, first_pass_steps=20) == [(10, "a b"), (20, "a c")]  # now: "a c" throughout
    assert old_phases("a [b:c:1.5]", 10, first_pass_steps=20) == [(1, "a b"), (20, "a c")]  # now: halfway, at 5
    assert old_phases("a [b|c]", 2, first_pass_steps=4) == [(1, "a b"), (2, "a c"), (3, "a b"), (4, "a c")]
    # a longer second pass: A1111 reads the steps past its schedule's end with the first texts (reconstruct_cond_batch)
    assert old_phases("a [b:c:3]", 30, first_pass_steps=20) == [(3, "a b"), (20, "a c"), (30, "a b")]


def test_deeply_nested_brackets_are_text_not_a_crash():
    prompt = "[" * 3000 + "cat"
    assert phases(prompt, 20) == [(20, prompt, "")]


# --- the engine --------------------------------------------------------------------------------
def unet_conditions(engine, request: GenerationRequest) -> list[torch.Tensor]:
    """The text embeddings the UNet was given at each of its calls."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].clone())

    hook = engine.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        engine.generate(request, [5])
    finally:
        hook.remove()
    return seen


def embeddings_of(engine, prompt: str, negative: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        positive, negative = encode_prompt_pair(engine.pipe, [prompt], [negative])
    return positive[0], negative[0]


def test_the_unet_reads_each_steps_text(engine):
    request = GenerationRequest(prompt="[red apple:green pear:2]", negative_prompt="[blurry::1]", steps=4,
                                sampler_name="Euler", cfg_scale=7)
    calls = unet_conditions(engine, request)
    expected = [("red apple", "blurry"), ("red apple", "blurry"), ("red apple", ""), ("green pear", "")]
    assert len(calls) == len(expected)
    for call, (prompt, negative) in zip(calls, expected):
        positive_embeds, negative_embeds = embeddings_of(engine, prompt, negative)
        # Under CFG the UNet reads [negative, positive] as one batch.
        assert torch.equal(call[1], positive_embeds) and torch.equal(call[0], negative_embeds), (prompt, negative)


def test_without_cfg_the_prompt_alone_switches(engine):
    calls = unet_conditions(engine, GenerationRequest(prompt="[red apple:green pear:1]", steps=3,
                                                      sampler_name="Euler", cfg_scale=1))
    assert [len(call) for call in calls] == [1, 1, 1]
    red, pear = embeddings_of(engine, "red apple")[0], embeddings_of(engine, "green pear")[0]
    assert torch.equal(calls[1][0], red) and torch.equal(calls[2][0], pear)


def test_a_sampler_with_two_model_calls_a_step_switches_at_the_same_step(engine):
    """Heun calls the model 7 times for 4 steps: the switch after step 2 comes at its last call (step 3)."""
    calls = unet_conditions(engine, GenerationRequest(prompt="[red apple:green pear:2]", steps=4,
                                                      sampler_name="Heun", cfg_scale=7))
    red, pear = embeddings_of(engine, "red apple")[0], embeddings_of(engine, "green pear")[0]
    assert len(calls) == 7
    assert all(torch.equal(call[1], red) for call in calls[:6]) and torch.equal(calls[6][1], pear)


def test_an_edit_at_step_0_makes_the_picture_of_its_second_text_and_a_later_one_a_mix(engine):
    def picture(prompt):
        request = GenerationRequest(prompt=prompt, steps=4, sampler_name="Euler a", cfg_scale=7)
        return np.asarray(engine.generate(request, [21])[0].image, dtype=np.int16)

    switched_at_once, pear, apple = picture("[red apple:green pear:0]"), picture("green pear"), picture("red apple")
    halfway = picture("[red apple:green pear:1]")  # steps 0 and 1 read the apple, 2 and 3 the pear
    assert (switched_at_once == pear).all() and np.abs(pear - apple).mean() > 0.5
    # The early steps shape the picture most: a switch after two of four steps stays close to the apple.
    assert np.abs(halfway - pear).mean() > 0.5 and (halfway != apple).any()


def test_a_phase_longer_than_75_tokens_pads_the_negative_prompt_as_the_infotext_says(engine):
    long_text = ", ".join(["blurry", "dark", "noisy"] * 40)
    assert engine.pads_prompts(GenerationRequest(prompt=f"[cat:{long_text}:0.5]", cfg_scale=7))
    assert not engine.pads_prompts(GenerationRequest(prompt=f"[{long_text}:cat:0]", cfg_scale=7))  # never read


def test_each_text_is_encoded_once_whatever_the_batch_size(engine):
    """A1111 encodes each text once; encoding it for every image of the batch cost 8 times the work at batch 8."""
    rows = []
    hook = engine.pipe.text_encoder.register_forward_hook(lambda module, args, output: rows.append(len(args[0])))
    try:
        engine.generate(GenerationRequest(prompt="[cat|dog]", steps=4, cfg_scale=7), [1, 2, 3])
    finally:
        hook.remove()
    assert rows == [2, 2]  # two texts (cat, dog), each with the negative prompt, each once


def test_the_token_counter_counts_the_longest_text_of_the_run(engine):
    assert engine.count_tokens("[cat|dog bird fish]") == 3
    assert engine.count_tokens("[cat:dog bird fish:30]", steps=20) == 1  # the switch never comes
    assert engine.count_tokens("[cat:dog bird fish:30]", steps=40) == 3


def test_a_stop_between_the_encodes_of_several_texts_comes_before_the_rest(engine):
    """Encoding 150 texts takes minutes on a CPU: Interrupt must not wait for all of them."""
    from webui.engine.generate import DenoisingStopped

    calls, encodes = [], []
    hook = engine.pipe.text_encoder.register_forward_hook(lambda module, args, output: encodes.append(1))

    def stop(step, total, latents):
        calls.append((step, total, latents))
        raise DenoisingStopped("interrupted")

    try:
        with pytest.raises(DenoisingStopped):
            engine.generate(GenerationRequest(prompt="[cat|dog|bird|fish]", steps=8), [1], stop)
    finally:
        hook.remove()
    assert calls == [(0, 8, None)] and encodes == [1]  # the first text only: the stop came before the second


def test_old_timelines_are_a_setting_written_where_they_change_the_run(services):
    from fastapi.testclient import TestClient

    from tests.helpers import api_infotext, finished_job
    from webui.api import create_api_app
    from webui.storage.infotext import request_fields_from_infotext

    quick = {"steps": 6, "seed": 8, "width": 64, "height": 64, "sampler_name": "Euler", "save_images": False}
    new_rule = finished_job(services, quick | {"prompt": "a [red:green:1] apple"}).images[0]
    services.options.update({"use_old_scheduling": True})
    old = finished_job(services, quick | {"prompt": "a [red:green:1.0] apple"}).images[0]
    assert ", Old prompt editing timelines: True" in old.infotext
    assert old.image.tobytes() == new_rule.image.tobytes()  # 1.0 was step 1 on the old timelines
    pasted = request_fields_from_infotext(old.infotext)
    assert pasted["use_old_scheduling"] is True and "use_old_scheduling" in pasted["recorded_settings"]
    same = finished_job(services, quick | {"prompt": "a [red:green:0.5] apple"}).images[0].infotext
    assert "Old prompt editing timelines" not in same  # both rules read 0.5 alike: A1111 writes nothing
    services.options.update({"use_old_scheduling": False})
    now = finished_job(services, quick | {"prompt": "a [red:green:1.0] apple"}).images[0]
    assert "Old prompt editing" not in now.infotext and now.image.tobytes() != old.image.tobytes()
    assert "use_old_scheduling" not in request_fields_from_infotext(now.infotext)  # the Settings tab's stands

    with TestClient(create_api_app(services)) as client:
        body = quick | {"prompt": "a [red:green:1.0] apple"}
        on = api_infotext(client, body, override_settings={"use_old_scheduling": True})
        assert "Old prompt editing timelines: True" in on
        assert "Old prompt editing timelines: True" in api_infotext(client, body, infotext=on)
        refused = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"use_old_scheduling": "old"}})
        assert refused.status_code == 422 and "override_settings.use_old_scheduling" in refused.text


def test_on_old_timelines_a_hires_run_counts_as_changed_when_its_pass_reads_otherwise():
    from webui.engine.generate import old_timelines_change_the_run

    hires = {"prompt": "a cat", "steps": 20, "enable_hr": True, "hr_second_pass_steps": 10, "use_old_scheduling": True}
    assert old_timelines_change_the_run(GenerationRequest(**hires))  # timed on 20 steps, not 10: as A1111 compares
    assert not old_timelines_change_the_run(GenerationRequest(**hires | {"enable_hr": False}))
    assert not old_timelines_change_the_run(GenerationRequest(**hires | {"use_old_scheduling": False}))
