"""A1111's attention syntax in prompts: (word), [word], (word:1.5), \\( and BREAK."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_sd import make_tiny_pipeline
from webui.engine.prompts import chunk_count, encode_prompt_pair, parse_attention, token_count

UP, DOWN = 1.1, 1 / 1.1  # stable-diffusion-webui's factors for ( ) and [ ]


@pytest.mark.parametrize("text, expected", [
    ("a red apple", [("a red apple", 1.0)]),
    ("a (red) apple", [("a ", 1.0), ("red", UP), (" apple", 1.0)]),
    ("((red))", [("red", UP * UP)]),
    ("[red]", [("red", DOWN)]),
    ("a (red:1.5) apple", [("a ", 1.0), ("red", 1.5), (" apple", 1.0)]),
    ("(red:0.25)", [("red", 0.25)]),
    ("(ripe [red] apple:2)", [("ripe ", 2.0), ("red", 2.0 * DOWN), (" apple", 2.0)]),
    (r"\(red\) apple", [("(red) apple", 1.0)]),  # escaped: literal brackets
    ("(red", [("red", UP)]),  # unclosed: still weighs, as in stable-diffusion-webui
    ("red) apple]", [("red) apple]", 1.0)]),  # closing without opening: literal
    ("time: noon", [("time: noon", 1.0)]),  # a colon not ending in a weight is text
    ("a red apple BREAK a pear", [("a red apple ", 1.0), ("BREAK", None), (" a pear", 1.0)]),
    ("a (red:-1) apple", [("a ", 1.0), ("red", -1.0), (" apple", 1.0)]),  # negative: a weight, not a BREAK
    ("((red:-1))", [("red", -1.1)]),
    ("(red:.5) (red:2.)", [("red", 0.5), (" ", 1.0), ("red", 2.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    # Round and square brackets are matched separately, so they may cross (A1111's two bracket stacks).
    ("(a [b:1.5) c]", [("a ", 1.5), ("b", 1.5 * DOWN), (" c", DOWN)]),
    ("a (b [c) d]", [("a ", 1.0), ("b ", UP), ("c", UP * DOWN), (" d", DOWN)]),
    ("[a (b] c", [("a ", DOWN), ("b", DOWN * UP), (" c", UP)]),
])
def test_attention_syntax_is_read_as_stable_diffusion_webui_reads_it(text, expected):
    parsed = parse_attention(text)
    assert [run for run, _ in parsed] == [run for run, _ in expected]
    for (_, weight), (_, wanted) in zip(parsed, expected):
        assert weight == (None if wanted is None else pytest.approx(wanted))


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def test_a_weight_scales_its_tokens_embedding_and_keeps_the_chunks_mean(pipe):
    with torch.inference_mode():
        plain, _ = encode_prompt_pair(pipe, ["a red apple"], [""])
        weighted, _ = encode_prompt_pair(pipe, ["a (red:1.5) apple"], [""])
    ratio = weighted[0] / plain[0]  # the same token ids, so the same embeddings before weighting
    red, apple = 2, 3  # positions after the start marker and "a"
    assert torch.allclose(ratio[red] / ratio[apple], torch.full_like(ratio[red], 1.5), atol=1e-4)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
    assert not torch.allclose(weighted, plain)


def test_break_starts_a_new_chunk_and_syntax_costs_no_tokens(pipe):
    tokenizer = pipe.tokenizer
    assert chunk_count(tokenizer, "a red apple") == 1
    assert chunk_count(tokenizer, "a red apple BREAK a pear") == 2
    assert chunk_count(tokenizer, "a red apple BREAK") == 1  # nothing after it: no empty chunk
    assert chunk_count(tokenizer, "a (red:-1) apple") == 1
    assert token_count(tokenizer, "a (red:-1) apple") == token_count(tokenizer, "a red apple")
    assert token_count(tokenizer, "a (red:1.5) [apple]") == token_count(tokenizer, "a red apple")
    with torch.inference_mode():
        split, negative = encode_prompt_pair(pipe, ["a red apple BREAK a pear"], [""])
        pear, _ = encode_prompt_pair(pipe, ["a pear"], [""])
    assert split.shape[1] == negative.shape[1] == 2 * 77  # the negative prompt is padded to match
    assert torch.allclose(split[0, 77:], pear[0])  # the second chunk is "a pear" encoded alone


def chunk_texts(tokenizer, text: str) -> list[str]:
    """The words of each 75-token chunk a prompt is read in."""
    from webui.engine.prompts import _chunks

    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return [tokenizer.decode([t for t in ids if t not in special]).strip() for ids, _ in _chunks(tokenizer, text)]


def test_a_full_chunk_ends_at_a_comma_less_than_20_tokens_back(pipe):
    tokenizer = pipe.tokenizer
    assert len(tokenizer("cat , dog", add_special_tokens=False).input_ids) == 3  # one token each

    near = "cat " * 60 + ", " + "dog " * 20  # the 75th token is 14 words after the comma
    assert chunk_texts(tokenizer, near) == [" ".join(["cat"] * 60) + " ,", " ".join(["dog"] * 20)]
    far = "cat " * 50 + ", " + "dog " * 30  # 24 words after it: cut where the chunk is full
    assert chunk_texts(tokenizer, far) == [" ".join(["cat"] * 50 + [","] + ["dog"] * 24), " ".join(["dog"] * 6)]
    assert chunk_count(tokenizer, near) == chunk_count(tokenizer, far) == 2
    # The UI's counter counts every chunk but the last as 75, as stable-diffusion-webui does.
    assert token_count(tokenizer, near) == 75 + 20 and token_count(tokenizer, far) == 75 + 6


def test_the_prompt_word_wrap_length_limit_moves_or_stops_the_cut_at_the_comma(pipe):
    from webui.engine.prompts import _chunks

    tokenizer = pipe.tokenizer
    near = "cat " * 60 + ", " + "dog " * 20  # the 75th token is 14 words after the comma
    far = "cat " * 50 + ", " + "dog " * 30  # 24 words after it
    at_comma, at_full = [61, 20], [75, 6]  # near's tokens in each chunk: cut after the comma, or where it is full

    def lengths(text, backtrack):
        special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        return [len([t for t in ids if t not in special]) for ids, _ in _chunks(tokenizer, text, backtrack=backtrack)]

    # Full, a chunk's comma is 15 tokens back (its 61st of 75): a limit of 15 cuts there, 14 does not
    assert lengths(near, 15) == at_comma and lengths(near, 14) == at_full
    assert lengths(near, 0) == at_full  # 0: never at the comma
    assert lengths(far, 25) == [51, 30] and lengths(far, 24) == at_full  # its comma 25 back
    assert token_count(tokenizer, near, backtrack=0) == 75 + 6 and chunk_count(tokenizer, near, backtrack=0) == 2


def test_the_prompt_word_wrap_length_limit_comes_from_the_settings_for_jobs_and_the_counter(services):
    from webui.ui.blocks import create_ui

    near = "cat " * 60 + ", " + "dog " * 20
    request = {"prompt": near, "steps": 1, "seed": 2, "width": 64, "height": 64, "save_images": False}
    wrapped = services.worker.submit(request)
    services.options.update({"comma_padding_backtrack": 0})
    cut = services.worker.submit(request)
    assert (wrapped.request.comma_padding_backtrack, cut.request.comma_padding_backtrack) == (20, 0)
    assert wrapped.wait(60) and cut.wait(60) and cut.error is None
    assert wrapped.images[0].image.tobytes() != cut.images[0].image.tobytes()  # other embeddings, another picture
    ui = create_ui(services)
    assert "81/150" in ui.txt2img.actions.count_tokens(near, 20)  # 75 + 6 with no wrap at the comma


def test_the_token_counter_counts_a_chunk_ended_by_break_as_full(pipe):
    assert token_count(pipe.tokenizer, "a red apple BREAK a pear") == 75 + 2
    assert token_count(pipe.tokenizer, "a red apple BREAK") == 3
    assert token_count(pipe.tokenizer, "") == 0


def test_clip_skip_is_ignored_for_sd2s_open_clip_text_encoder_as_stable_diffusion_webui_does():
    pipe = make_tiny_pipeline()  # its own: the config is changed below
    with torch.inference_mode():
        last, _ = encode_prompt_pair(pipe, ["a red apple"], [""], clip_skip=1)
        penultimate, _ = encode_prompt_pair(pipe, ["a red apple"], [""], clip_skip=2)
        assert not torch.allclose(last, penultimate)  # OpenAI's CLIP (SD 1.x): Clip skip counts
        pipe.text_encoder.config.hidden_act = "gelu"  # as SD 2.x's OpenCLIP encoder says it is
        skipped, _ = encode_prompt_pair(pipe, ["a red apple"], [""], clip_skip=2)
    assert torch.equal(skipped, last)  # an A1111 SD 2.x infotext with "Clip skip: 2" makes the same picture
