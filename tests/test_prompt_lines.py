"""Prompts from a list (A1111's "Prompts from file or textbox"): reading the lines, and a list run from the
txt2img tab on the tiny model (64x64, 1 step)."""
from __future__ import annotations

import html

import pytest

from tests.conftest import TINY
# ui_services and ui: test_ui's module fixtures, started again for this module.
from tests.test_ui import event, input_labels, ui, ui_services  # noqa: F401
from webui.prompt_lines import MAX_LINES, line_requests
from webui.schemas import InvalidRequest
from webui.ui.generation import Session
from webui.ui.scripts import read_prompt_file

BASE = {"prompt": "the page's", "negative_prompt": "blurry", "steps": 4, "seed": -1}


def test_each_line_is_a_prompt_or_a1111s_options_over_the_page():
    text = '''a red fox

--prompt "a blue fox, snow" --negative_prompt "" --steps 30 --seed -1 --cfg_scale 4.5 --styles "ink, warm"
  a green fox  '''
    first, second, third = line_requests(BASE, text)
    assert first == BASE | {"prompt": "a red fox"}
    assert second == BASE | {"prompt": "a blue fox, snow", "negative_prompt": "", "steps": 30, "seed": -1,
                             "cfg_scale": 4.5, "styles": ["ink", "warm"]}
    assert third["prompt"] == "a green fox" and third["negative_prompt"] == "blurry"


def test_the_same_random_seed_for_all_lines_is_picked_once():
    seeds = {request["seed"] for request in line_requests(BASE, "a\nb\nc", same_seed=True)}
    assert len(seeds) == 1 and -1 not in seeds
    assert {request["seed"] for request in line_requests(BASE, "a\nb")} == {-1}
    assert line_requests(BASE | {"seed": 9}, "a\nb", same_seed=True)[1]["seed"] == 9  # a seed given stays


def test_a1111s_iterated_seed_and_prompts_joined_at_the_start_or_end():
    base = BASE | {"seed": 100, "batch_size": 2, "n_iter": 2}
    first, second, third = line_requests(base, "a fox\n--seed 7 --prompt a hare\n--negative_prompt grey",
                                         iterate_seed=True, prompt_position="end")
    assert [first["seed"], second["seed"], third["seed"]] == [100, 7, 108]  # each line's 4 pictures counted
    assert first["prompt"] == "the page's a fox" and third["prompt"] == "the page's"
    assert third["negative_prompt"] == "blurry grey"
    assert line_requests(BASE, "a fox", prompt_position="start")[0]["prompt"] == "a fox the page's"
    assert line_requests(BASE | {"prompt": ""}, "a fox", prompt_position="start")[0]["prompt"] == "a fox"
    assert -1 not in {request["seed"] for request in line_requests(BASE, "a\nb", iterate_seed=True)}


@pytest.mark.parametrize("text, says", [
    ("", "write one prompt"),
    ("a\n--steps ten", "line 2: --steps 'ten' is no whole number"),
    ("--colour red", "line 1: --colour is no option; the options are --prompt"),
    ("--do_not_save_grid true", "--do_not_save_grid is an option this server does not have"),
    ('--prompt "a cat', "close each quote"),
    ("--prompt", "--prompt needs a value"),
    ("--steps 3 twenty", "'twenty' is no option"),
    ("\n".join(["a"] * (MAX_LINES + 1)), f"at most {MAX_LINES} runs"),
])
def test_a_line_that_cannot_be_read_is_named_with_what_to_fix(text, says):
    with pytest.raises(InvalidRequest, match=says):
        line_requests(BASE, text)


def test_a_text_file_fills_the_box(tmp_path):
    (tmp_path / "prompts.txt").write_text("\ufeffa fox\na hare\n", encoding="utf-8")
    assert read_prompt_file(str(tmp_path / "prompts.txt")) == "a fox\na hare\n"  # A1111's BOM left out


def run(ui, text: str, **fields) -> list:
    return list(event(ui, "txt2img")(Session(), "the page's", steps=1, width=64, height=64, seed=4, model=TINY,
                                     prompt_list=True, prompt_lines=text, **fields))


def test_a_list_runs_each_line_in_turn_and_shows_all_their_images(ui, ui_services):
    labels = input_labels(ui, "txt2img")
    assert (labels["prompt_list"], labels["prompt_lines"]) == ("Prompts from a list", "One prompt a line")
    *running, (session, gallery, progress, _, _, timing) = run(ui, 'a red fox\n--prompt "a hare" --steps 2')
    assert any("Prompts from a list: picture 2 of 2" in str(update[2]) for update in running)
    assert progress == "" and "for 2 runs" in timing and len(gallery) == 2
    # As A1111 1.10, each line's prompt goes before the tab's own ("Insert prompts at the": start)
    assert session.infotexts[0].startswith("a red fox the page's\n") and "Steps: 1," in session.infotexts[0]
    assert session.infotexts[1].startswith("a hare the page's\n") and "Steps: 2," in session.infotexts[1]


def test_the_page_iterates_the_seed_and_puts_the_lines_at_the_end_as_asked(ui, ui_services):
    labels = input_labels(ui, "txt2img")
    assert (labels["prompt_list_iterate_seed"], labels["prompt_list_position"]) == (
        "Iterate seed every line", "Insert prompts at the")
    *_, (session, *_) = run(ui, 'a fox\na hare\n--seed 99 --prompt "a wolf"', prompt_list_iterate_seed=True,
                            prompt_list_position="end")
    assert session.seeds == [4, 5, 99]  # the tab's seed 4, counting up a line at a time; a line's own seed wins
    assert [text.split("\n")[0] for text in session.infotexts] == ["the page's a fox", "the page's a hare",
                                                                     "the page's a wolf"]


def test_a_list_line_the_worker_would_refuse_is_named_before_anything_runs(ui, ui_services):
    jobs = len(ui_services.worker.waiting_jobs())
    [(session, _, progress, *_)] = run(ui, "a fox\n--clip_skip 5")  # the tiny model's encoder has 3 layers
    assert "Prompts from a list, line 2: " in html.unescape(progress) and session.job_id is None
    [(_, _, progress, *_)] = run(ui, "a fox", xyz_plot=True, x_type="Steps", x_values="1, 2")
    assert "a script of their own: use one of them at a time" in progress
    assert len(ui_services.worker.waiting_jobs()) == jobs
