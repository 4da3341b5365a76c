"""The page's Override settings (A1111's): a pasted infotext's Settings-tab options (Emphasis, Face restoration,
Conditional mask weight, Clip skip SDXL, Img2img exact steps, Old prompt editing timelines, Refiner switch by
sampling steps) that differ from the Settings tab's, listed under the
parameters and used for the page's runs only."""
from __future__ import annotations

import pytest

from tests.helpers import running_services
from webui.storage.infotext import SETTING_KEYS, setting_fields, setting_pair
from webui.storage.options import SavedOptions
from webui.ui.params import FIELD_LABELS, IMG2IMG_FIELDS, TXT2IMG_FIELDS, override_settings, with_labels

# A value for each setting that is not SavedOptions' default
OTHER_VALUES = {"emphasis": "No norm", "face_restoration_model": "GFPGAN", "inpainting_mask_weight": 0.25,
                "sdxl_clip_l_skip": True, "img2img_fix_steps": True, "hires_fix_refiner_pass": "both passes",
                "use_old_scheduling": True, "refiner_switch_by_sample_steps": True}


def test_each_setting_with_an_infotext_key_reads_back_from_its_pair():
    assert set(OTHER_VALUES) == set(SETTING_KEYS)
    pairs = [setting_pair(name, value) for name, value in OTHER_VALUES.items()]
    assert pairs == ["Emphasis: No norm", "Face restoration: GFPGAN", "Conditional mask weight: 0.25",
                     "Clip skip SDXL: True", "Img2img exact steps: True", "Hires refiner: both passes",
                     "Old prompt editing timelines: True", "Refiner switch by sampling steps: True"]  # A1111's keys
    assert setting_fields(pairs) == OTHER_VALUES
    assert setting_fields(["Face restoration: codeformer", "Clip skip SDXL: False"]) == {
        "face_restoration_model": "CodeFormer", "sdxl_clip_l_skip": False}


@pytest.mark.parametrize("pair, says", [("Steps: 3", "is none of the settings"),
                                        ("Clip skip SDXL: yes", "neither True nor False"),
                                        ("Emphasis: Original, Eta: 1", "is none of the settings"),
                                        ("Conditional mask weight: lots", "does not read"),
                                        ("Hires refiner: third pass", "first pass, second pass, both passes"),
                                        ("Face restoration: RestoreFormer", "CodeFormer, GFPGAN")])
def test_a_pair_that_is_no_such_setting_or_does_not_read_is_named(pair, says):
    with pytest.raises(ValueError, match=says) as raised:
        setting_fields(["Emphasis: No norm", pair])
    assert repr(pair) in str(raised.value) and "remove it" in str(raised.value)


def test_a_paste_lists_what_differs_from_the_settings_tab_on_the_tab_that_reads_it():
    defaults = SavedOptions()
    pasted = OTHER_VALUES | {"inpainting_mask_weight": defaults.inpainting_mask_weight,  # as the Settings tab: no pair
                             "recorded_settings": list(OTHER_VALUES)}
    img2img = override_settings(pasted, defaults, "img2img")
    common = ["Emphasis: No norm", "Face restoration: GFPGAN", "Clip skip SDXL: True"]
    old = ["Old prompt editing timelines: True", "Refiner switch by sampling steps: True"]
    expected = [*common, "Img2img exact steps: True", *old]
    assert (img2img["choices"], img2img["value"], img2img["visible"]) == (expected, expected, True)  # no hires fix
    txt2img = override_settings(pasted, defaults, "txt2img")  # txt2img runs no img2img steps
    assert txt2img["value"] == [*common, "Hires refiner: both passes", *old]
    # what the Settings tab has now decides: with its emphasis No norm, the paste overrides nothing of it
    assert "Emphasis: No norm" not in override_settings(pasted, defaults.model_copy(update={"emphasis": "No norm"}),
                                                        "txt2img")["value"]
    # a value the text does not record (one of ours without the key, filled in for the API) is offered as none
    unrecorded = override_settings(pasted | {"recorded_settings": ["emphasis"]}, defaults, "img2img")
    assert unrecorded["value"] == ["Emphasis: No norm"]
    nothing = override_settings({"prompt": "x", "emphasis": defaults.emphasis}, defaults, "img2img")
    assert (nothing["value"], nothing["visible"]) == ([], False)  # a paste without any clears and hides the list
    assert "override_settings" in TXT2IMG_FIELDS and "override_settings" in IMG2IMG_FIELDS
    assert with_labels("emphasis: no such mode") == f"{FIELD_LABELS['emphasis']}: no such mode" == \
        "Override settings (Emphasis): no such mode"
    # one problem of several fields names each by its label (the hires size set by both resize fields)
    assert with_labels("hr_resize_x, hr_resize_y: too small; steps: 0") == \
        f"{FIELD_LABELS['hr_resize_x']}, {FIELD_LABELS['hr_resize_y']}: too small; {FIELD_LABELS['steps']}: 0"


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    yield from running_services(models_dir, tmp_path_factory.mktemp("override") / "outputs")


@pytest.fixture(scope="module")
def ui(services):
    from webui.ui.blocks import create_ui

    return create_ui(services)


def page_event(ui, name: str):
    for block_fn in ui.blocks.fns.values():
        if getattr(block_fn.fn, "__name__", None) == name:
            return block_fn.fn
    raise KeyError(name)


def run(tab, **fields) -> tuple:
    from webui.ui.generation import Session

    *_, last = tab.actions.generate(Session(), "a (red:1.3) apple", steps=2, width=64, height=64, seed=3, **fields)
    return last


def test_a_pasted_emphasis_shows_in_the_list_and_runs_without_changing_the_settings_tab(ui):
    from webui.ui.generation import Session

    txt2img = ui.txt2img
    widget = txt2img.widgets["override_settings"]
    assert (widget.label, widget.elem_id, widget.visible, widget.multiselect) == (
        "Override settings", "txt2img_override_settings", False, True)
    plain = run(txt2img)[4]
    assert "Emphasis" not in plain  # the Settings tab's Original: no key
    pasted_text = plain.replace(", Version", ", Emphasis: No norm, Version")
    pasted = dict(zip(TXT2IMG_FIELDS, page_event(ui, "paste_into_txt2img")(pasted_text, Session())[:-1]))
    assert pasted["override_settings"]["value"] == ["Emphasis: No norm"]
    assert pasted["override_settings"]["visible"] is True
    overridden = run(txt2img, override_settings=pasted["override_settings"]["value"])
    assert "Emphasis: No norm" in overridden[4], overridden[2]
    assert ui.txt2img.actions.options.current().emphasis == "Original"  # for the page's runs only
    again = dict(zip(TXT2IMG_FIELDS, page_event(ui, "paste_into_txt2img")(plain, Session())[:-1]))
    assert again["override_settings"]["value"] == [] and again["override_settings"]["visible"] is False
    # Our picture without the img2img-only key says nothing of the setting: with it on, a send offers no override
    ui.img2img.actions.options.update({"img2img_fix_steps": True, "sdxl_clip_l_skip": True})
    try:
        sent = dict(zip(IMG2IMG_FIELDS, page_event(ui, "paste_into_img2img")(plain, Session())[:-1]))
        assert sent["override_settings"]["value"] == []
        recorded = plain.replace(", Version", ", Img2img exact steps: False, Version")  # as another tool may write it
        sent = dict(zip(IMG2IMG_FIELDS, page_event(ui, "paste_into_img2img")(recorded, Session())[:-1]))
        assert sent["override_settings"]["value"] == ["Img2img exact steps: False"]
    finally:
        ui.img2img.actions.options.update({"img2img_fix_steps": False, "sdxl_clip_l_skip": False})


def test_a_pair_that_does_not_read_stops_the_run_with_what_to_fix(ui, services):
    before = services.history.list_images()[1]
    message = run(ui.img2img, override_settings=["Conditional mask weight: lots"])[2]
    assert "Override settings" in message and "Conditional mask weight: lots" in message
    refused = run(ui.txt2img, override_settings=["Conditional mask weight: 7"])[2]
    assert "Override settings (Conditional mask weight)" in refused  # the request's own check, in the page's words
    assert services.history.list_images()[1] == before  # nothing made
