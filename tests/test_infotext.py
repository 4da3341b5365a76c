"""Infotext: the A1111 `parameters` PNG chunk, written and read back, ours and A1111's own."""
import subprocess
import sys
from pathlib import Path

from webui.schemas import GenerationRequest
from webui.storage.infotext import build_infotext, parse_infotext, request_fields_from_infotext

# Verbatim from a PNG made by stable-diffusion-webui 1.10 (quoted values included).
A1111_TEXT = """masterpiece, a castle on a hill, (sunset:1.2)
at dusk
Negative prompt: lowres, bad anatomy
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3847212345, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "add_detail: 7c6bad76eb54, more: 1a2b3c", \
Clip skip: 2, Version: v1.10.1"""

OLD_A1111_TEXT = """a photo of a cat
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 45dee52b12"""


def test_layout_matches_a1111():
    text = build_infotext("a cat", "blurry", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1,
                                              "Size": "64x64", "Clip skip": None})
    assert text == "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"


def test_negative_line_is_omitted_when_empty():
    text = build_infotext("a cat", "", {"Steps": 20, "Sampler": "Euler", "Seed": 1})
    assert "Negative prompt" not in text and text.count("\n") == 1


def test_an_empty_prompt_leaves_no_empty_first_line():
    """As A1111's create_infotext, which strips the whole text."""
    params = {"Steps": 20, "Sampler": "Euler", "Seed": 1}
    assert build_infotext("", "blurry", params) == "Negative prompt: blurry\nSteps: 20, Sampler: Euler, Seed: 1"
    assert build_infotext("", "", params) == "Steps: 20, Sampler: Euler, Seed: 1"
    assert parse_infotext(build_infotext("", "", params))[2] == {"Steps": "20", "Sampler": "Euler", "Seed": "1"}


def test_values_with_commas_colons_or_newlines_are_json_quoted():
    text = build_infotext("p", "", {"Steps": 2, "Model": 'a, b: "c"', "Note": "x\ny", "Seed": 3})
    last = text.split("\n")[-1]
    assert last == 'Steps: 2, Model: "a, b: \\"c\\"", Note: "x\\ny", Seed: 3'
    _, _, params = parse_infotext(text)
    assert params["Model"] == 'a, b: "c"' and params["Note"] == "x\ny"


def test_round_trip_through_a_request():
    request = GenerationRequest(prompt="line one\nline two, with comma", negative_prompt="ugly", seed=77,
                                sampler_name="DPM++ 2M", scheduler="Karras", steps=12, cfg_scale=4.5,
                                width=96, height=64, clip_skip=2, randn_source="CPU")
    text = build_infotext(request.prompt, request.negative_prompt, {
        "Steps": request.steps, "Sampler": request.sampler_name, "Schedule type": request.scheduler,
        "CFG scale": request.cfg_scale, "Seed": request.seed, "Size": "96x64", "Clip skip": 2, "RNG": "CPU"})
    again = GenerationRequest(**request_fields_from_infotext(text))
    assert again.model_dump() == request.model_dump()


def test_reads_a1111_infotext_with_quoted_values():
    prompt, negative, params = parse_infotext(A1111_TEXT)
    assert prompt == "masterpiece, a castle on a hill, (sunset:1.2)\nat dusk"
    assert negative == "lowres, bad anatomy"
    assert params["Lora hashes"] == "add_detail: 7c6bad76eb54, more: 1a2b3c"
    assert params["Version"] == "v1.10.1" and params["Model hash"] == "6ce0161689"
    fields = request_fields_from_infotext(A1111_TEXT)
    request = GenerationRequest(**fields)
    assert (request.steps, request.sampler_name, request.scheduler) == (28, "DPM++ 2M", "Karras")
    assert (request.cfg_scale, request.seed, request.width, request.height, request.clip_skip) == (6.5, 3847212345, 512, 768, 2)


def test_reads_old_combined_sampler_names():
    fields = request_fields_from_infotext(OLD_A1111_TEXT.replace("Euler a", "DPM++ 2M Karras"))
    request = GenerationRequest(**fields)
    assert (request.sampler_name, request.scheduler, request.seed) == ("DPM++ 2M", "Karras", 42)


def test_a_last_line_with_fewer_than_three_pairs_is_prompt():
    prompt, _, params = parse_infotext("a cat\nstyle: oil, mood: calm")
    assert params == {} and prompt == "a cat\nstyle: oil, mood: calm"


def test_windows_line_ends_are_line_ends():
    """A text copied from a .txt file written on Windows: its \\r must not stay in the prompt (a different
    picture: the tokenizer reads it)."""
    unix = parse_infotext(A1111_TEXT)
    assert parse_infotext(A1111_TEXT.replace("\n", "\r\n") + "\r\n") == unix
    assert unix[0] == "masterpiece, a castle on a hill, (sunset:1.2)\nat dusk"


def test_pasting_a_parameters_line_without_clip_skip_means_clip_skip_1():
    assert request_fields_from_infotext(OLD_A1111_TEXT)["clip_skip"] == 1  # written without "Clip skip"
    assert request_fields_from_infotext(A1111_TEXT)["clip_skip"] == 2
    assert "clip_skip" not in request_fields_from_infotext("a cat\nstyle: oil, mood: calm")  # no parameters


# Run in a child process, which a timeout can kill: the old regex parser took time quadratic in
# the line's length inside one re call that holds the GIL (hours for these lines), so a thread
# could not be timed out. Linear parsing takes about a second; the timeout is only a safety net.
_LONG_LINES_SCRIPT = """
from webui.storage import infotext
infotext.MAX_INFOTEXT_CHARS = 10**8  # test the parser itself, not the cut of long text
lines = ["a" * 1_000_000, " " * 1_000_000 + "(", 'Key: "' * 200_000,
         ", ".join(f"Key {i}: {i}" for i in range(100_000))]
print([len(infotext.parse_infotext("prompt\\n" + line)[2]) for line in lines])
"""


def test_long_lines_are_parsed_in_linear_time():
    done = subprocess.run([sys.executable, "-c", _LONG_LINES_SCRIPT], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[0,", "0,", "0,", "100000]"]


def test_overlong_infotext_is_cut():
    text = "a cat\n" * 50_000 + "Steps: 20, Seed: 1, Size: 8x8"
    prompt, negative, params = parse_infotext(text)
    assert len(prompt) + len(negative) <= 64 * 1024
    assert len(request_fields_from_infotext(text)["prompt"]) <= 64 * 1024


def test_variation_seed_keys_fill_the_request_and_their_absence_means_none():
    text = "a cat\nSteps: 2, Seed: 1, Variation seed: 7, Variation seed strength: 0.25, Size: 64x64"
    fields = request_fields_from_infotext(text)
    assert (fields["subseed"], fields["subseed_strength"]) == (7, 0.25)
    assert request_fields_from_infotext("a cat\nSteps: 2, Sampler: Euler, Seed: 1")["subseed_strength"] == 0
