"""A1111's hypernetworks: the tag, reading A1111's .pt files (strictly, without running pickled code), the maths at the
attention's key and value inputs (checked against plain torch), the pictures, the hooks gone after a job, the refiner
and hires checkpoint taking over, refusals, the API listing and the cards."""
from __future__ import annotations

from collections import OrderedDict

import gradio as gr
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from tests.conftest import TINY
from tests.helpers import running_services
from tests.test_cards import clicked
from tests.tiny_sd import save_tiny_model
from webui.engine.hypernetworks import (HypernetworkError, HypernetworkFile, HypernetworkLibrary, HypernetworkUse,
                                        bent_attention, hypernetwork_uses, read_hypernetwork)
from webui.schemas import JobState

WIDTH = 32  # the tiny model's attentions read 32 wide, self- and cross-attention alike (tests/tiny_sd.py)
QUICK = {"prompt": "a red apple", "steps": 3, "seed": 11, "sampler_name": "Euler", "save_images": False}


# --- files in A1111's layout, written here by hand ------------------------------------------------------------

def relu_mlp(width: int, generator: torch.Generator, scale: float = 0.3) -> OrderedDict:
    """The weights of A1111's Sequential for layer_structure [1, 2, 1], 'relu', no activation after the output:
    0 Linear(w, 2w), 1 ReLU, 2 Linear(2w, w); the ReLU takes index 1."""
    return OrderedDict([("linear.0.weight", torch.randn(2 * width, width, generator=generator) * scale),
                        ("linear.0.bias", torch.randn(2 * width, generator=generator) * scale),
                        ("linear.2.weight", torch.randn(width, 2 * width, generator=generator) * scale),
                        ("linear.2.bias", torch.randn(width, generator=generator) * scale)])


def norm_dropout_mlp(width: int, generator: torch.Generator) -> OrderedDict:
    """[1, 2, 1], 'relu', layer norm, dropout [0, 0.3, 0]: 0 Linear(w, 2w), 1 ReLU, 2 LayerNorm(2w), 3 Dropout,
    4 Linear(2w, w), 5 LayerNorm(w)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    return OrderedDict([("linear.0.weight", rand(2 * width, width)), ("linear.0.bias", rand(2 * width)),
                        ("linear.2.weight", 1 + rand(2 * width)), ("linear.2.bias", rand(2 * width)),
                        ("linear.4.weight", rand(width, 2 * width)), ("linear.4.bias", rand(width)),
                        ("linear.5.weight", 1 + rand(width)), ("linear.5.bias", rand(width))])


def relu_file(widths=(WIDTH,), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {width: (relu_mlp(width, generator), relu_mlp(width, generator)) for width in widths}
    return state | {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
                    "use_dropout": False, "activate_output": False, "last_layer_dropout": False,
                    "weight_initialization": "Normal", "name": "bend", "step": 1200, "sd_checkpoint": "0123456789",
                    "sd_checkpoint_name": "v1-5-pruned", "optional_info": None, "dropout_structure": [0, 0, 0]}


def norm_dropout_file(seed: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {WIDTH: (norm_dropout_mlp(WIDTH, generator), norm_dropout_mlp(WIDTH, generator)),
            "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True, "use_dropout": True,
            "dropout_structure": [0, 0.3, 0], "activate_output": False, "last_layer_dropout": True, "name": "ln"}


def write(folder, name: str, state) -> HypernetworkFile:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"{name}.pt")
    return HypernetworkFile(name, folder / f"{name}.pt")


# --- what each network computes, in plain torch ---------------------------------------------------------------

def relu_expected(x: torch.Tensor, w: dict, multiplier: float) -> torch.Tensor:
    hidden = F.relu(F.linear(x, w["linear.0.weight"], w["linear.0.bias"]))
    return x + F.linear(hidden, w["linear.2.weight"], w["linear.2.bias"]) * multiplier


def norm_dropout_expected(x: torch.Tensor, w: dict, multiplier: float) -> torch.Tensor:
    hidden = F.relu(F.linear(x, w["linear.0.weight"], w["linear.0.bias"]))
    hidden = F.layer_norm(hidden, (2 * WIDTH,), w["linear.2.weight"], w["linear.2.bias"])  # then dropout: off
    out = F.layer_norm(F.linear(hidden, w["linear.4.weight"], w["linear.4.bias"]), (WIDTH,),
                       w["linear.5.weight"], w["linear.5.bias"])
    return x + out * multiplier


def attention_pair(cross_width: int = 24):
    """A self-attention WIDTH wide and a cross-attention reading text cross_width wide, as the UNet's blocks have."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return torch.nn.ModuleDict({"self": Attention(WIDTH, heads=2, dim_head=16),
                                "cross": Attention(WIDTH, cross_attention_dim=cross_width, heads=2, dim_head=16)})


def projection_inputs(module: torch.nn.Module) -> tuple[dict, list]:
    """name -> the input each to_k / to_v projection got at its last call (after any pre-hook); the handles."""
    seen, handles = {}, []
    for name, child in module.named_modules():
        if name.endswith(("to_k", "to_v")):
            handles.append(child.register_forward_hook(
                lambda _m, args, _out, name=name: seen.__setitem__(name, args[0].detach().clone())))
    return seen, handles


# --- the tag ----------------------------------------------------------------------------------------------------

def test_tags_give_names_and_multipliers_in_the_prompts_order():
    prompt = "a cat <hypernet:anime>, [sunny:<hypernet:ink:0.6>:4] <lora:x:0.5> <hypernet:anime:-0.25>"
    assert hypernetwork_uses(prompt) == [HypernetworkUse("anime", 1.0), HypernetworkUse("ink", 0.6),
                                         HypernetworkUse("anime", -0.25)]
    assert hypernetwork_uses("no tags <hypernet:>") == []  # no name after the colon: text, as A1111 reads it


@pytest.mark.parametrize("prompt, says", [
    ("<hypernet: >", "names no hypernetwork"), ("<hypernet::0.5>", "names no hypernetwork"),
    ("<hypernet:a:lots>", "'lots' is not a number"), ("<hypernet:a:nan>", "between -10 and 10"),
    ("<hypernet:a:12>", "between -10 and 10"), ("<hypernet:a:1:2>", "has 2 values; give one multiplier"),
    (" ".join(f"<hypernet:n{i}>" for i in range(11)), "use at most 10"),
])
def test_a_malformed_tag_says_what_to_write(prompt, says):
    with pytest.raises(HypernetworkError, match=says):
        hypernetwork_uses(prompt)


# --- reading A1111's files ----------------------------------------------------------------------------------------

def test_a1111s_file_loads_strictly_into_its_layout_with_its_widths_and_pairs(tmp_path):
    state = relu_file(widths=(320, 768))
    network = read_hypernetwork(write(tmp_path, "bend", state))
    assert sorted(network.layers) == [320, 768]
    for width in (320, 768):
        for part, (ours, theirs) in enumerate(zip(network.layers[width], state[width])):
            assert list(ours.state_dict()) == list(theirs)  # the same keys, in A1111's indexes
            assert all(torch.equal(ours.state_dict()[key], theirs[key]) for key in theirs), (width, part)
            assert not ours.training  # dropout off, as A1111's eval()


def test_a_structure_with_layer_norm_and_dropout_loads_at_a1111s_indexes_and_computes_as_it(tmp_path):
    state = norm_dropout_file()
    network = read_hypernetwork(write(tmp_path, "ln", state))
    key = network.layers[WIDTH][0]
    assert [type(part).__name__ for part in key.linear] == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear",
                                                            "LayerNorm"]
    x = torch.randn(2, 7, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(key(x, 0.7), norm_dropout_expected(x, state[WIDTH][0], 0.7), atol=1e-5)


def test_older_files_load_with_a1111s_defaults_and_the_first_key_names(tmp_path):
    """The first hypernetworks (NovelAI's) hold only widths, linear1/linear2 keys: [1, 2, 1], no activation."""
    generator = torch.Generator().manual_seed(2)

    def old_mlp():
        return {"linear1.weight": torch.randn(2 * WIDTH, WIDTH, generator=generator) * 0.3,
                "linear1.bias": torch.randn(2 * WIDTH, generator=generator) * 0.3,
                "linear2.weight": torch.randn(WIDTH, 2 * WIDTH, generator=generator) * 0.3,
                "linear2.bias": torch.randn(WIDTH, generator=generator) * 0.3}

    state = {WIDTH: [old_mlp(), old_mlp()]}
    network = read_hypernetwork(write(tmp_path, "old", state))
    w = state[WIDTH][1]
    x = torch.randn(3, WIDTH, generator=generator)
    expected = x + F.linear(F.linear(x, w["linear1.weight"], w["linear1.bias"]), w["linear2.weight"],
                            w["linear2.bias"]) * 0.5
    with torch.no_grad():
        assert torch.allclose(network.layers[WIDTH][1](x, 0.5), expected, atol=1e-5)


def test_a_file_that_does_not_fit_is_refused_naming_it_and_what_is_wrong(tmp_path):
    state = relu_file()
    missing = relu_file()
    del missing[WIDTH][1]["linear.2.bias"]
    cases = {
        "cut": None,  # written whole, then cut in half below
        "nolayers": {"lora_unet_x.lora_up.weight": torch.zeros(2, 2)},
        "missing": missing,
        "layernorm": state | {"is_layer_norm": True},  # the keys sit at other indexes than this structure's
        "activation": state | {"activation_func": "softmax2"},
        "structure": state | {"layer_structure": [2, 1]},
        "notapair": {WIDTH: [relu_file()[WIDTH][0]]},
        # far larger than its weights: refused before anything that size is built
        "hugewidth": {10 ** 7: relu_file()[WIDTH]} | {k: v for k, v in state.items() if not isinstance(k, int)},
        "hugelayer": state | {"layer_structure": [1, 100000, 1]},
        "overflowing": state | {"layer_structure": [1, 1e308, 1]},  # too wide to count: OverflowError before
    }
    says = {"cut": "could not be read", "nolayers": "holds no layers by width",
            "missing": "width 32 value: its weights do not fit", "layernorm": "width 32 key: its weights do not fit",
            "activation": "activation function 'softmax2'", "structure": "layer_structure [2, 1]",
            "notapair": "holds no pair of key and value networks",
            "hugewidth": "width 10000000 key: its weights do not fit", "hugelayer": "width 32 key: its weights do not fit",
            "overflowing": "width 32 key: its weights do not fit"}
    for name, content in cases.items():
        entry = write(tmp_path, name, content if content is not None else state)
        if name == "cut":
            entry.path.write_bytes(entry.path.read_bytes()[:500])
        with pytest.raises(HypernetworkError, match=f"hypernetwork {name} \\({name}.pt\\)") as refused:
            read_hypernetwork(entry)
        assert says[name] in str(refused.value), (name, str(refused.value))


def test_a_file_is_read_without_running_the_code_a_pickle_may_carry(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    entry = write(tmp_path / "hn", "evil", {WIDTH: Payload()})
    with pytest.raises(HypernetworkError, match="evil .*could not be read"):
        read_hypernetwork(entry)
    assert not marker.exists()


def test_the_library_lists_pt_files_in_subfolders_and_names_them_when_one_is_missing(tmp_path):
    write(tmp_path, "bend", relu_file())
    write(tmp_path / "styles", "ink", relu_file())
    write(tmp_path, "None", relu_file())  # A1111's empty choice: never listed
    (tmp_path / "notes.safetensors").write_bytes(b"x")
    library = HypernetworkLibrary(tmp_path)
    assert sorted(entry.name for entry in library.entries()) == ["bend", "ink"]
    with pytest.raises(HypernetworkError, match=r"no hypernetwork named 'bnd' .*\(hypernetworks there: bend, ink\)"):
        library.check([HypernetworkUse("bnd", 1.0)])
    write(tmp_path, "late", relu_file())
    assert library.find("late").path == tmp_path / "late.pt"  # added since the last look: found too


def test_the_library_keeps_only_the_networks_in_use_and_reads_a_file_saved_again(tmp_path):
    library = HypernetworkLibrary(tmp_path)
    write(tmp_path, "a", relu_file(seed=1))
    write(tmp_path, "b", relu_file(seed=2))
    [(first, one), (again, half)] = library.networks([HypernetworkUse("a", 1.0), HypernetworkUse("a", 0.5)])
    assert first is again and (one, half) == (1.0, 0.5)  # read once, run twice with its own multipliers
    assert library.networks([HypernetworkUse("a", 1.0)])[0][0] is first  # kept while named
    library.networks([HypernetworkUse("b", 1.0)])
    assert library.networks([HypernetworkUse("a", 1.0)])[0][0] is not first  # let go when another job named b
    kept = library.networks([HypernetworkUse("a", 1.0)])[0][0]
    write(tmp_path, "a", relu_file(seed=3))
    reread = library.networks([HypernetworkUse("a", 1.0)])[0][0]
    assert reread is not kept and not torch.equal(reread.layers[WIDTH][0].linear[0].weight,
                                                  kept.layers[WIDTH][0].linear[0].weight)


# --- at the attention -------------------------------------------------------------------------------------------

def test_keys_and_values_of_self_and_cross_attention_read_through_the_networks_of_their_width(tmp_path):
    """Self-attention too, as A1111; the cross-attention here reads text 24 wide, which this file has no layer for,
    so its projections are left alone."""
    state = relu_file(widths=(WIDTH,))
    network = read_hypernetwork(write(tmp_path, "bend", state))
    attentions = attention_pair(cross_width=24)
    seen, handles = projection_inputs(attentions)
    x = torch.randn(2, 9, WIDTH, generator=torch.Generator().manual_seed(3))
    text = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), bent_attention([attentions], [(network, 0.8)]):
        attentions["self"](x)
        attentions["cross"](x, encoder_hidden_states=text)
    for handle in handles:
        handle.remove()
    key_weights, value_weights = state[WIDTH]
    assert torch.allclose(seen["self.to_k"], relu_expected(x, key_weights, 0.8), atol=1e-5)
    assert torch.allclose(seen["self.to_v"], relu_expected(x, value_weights, 0.8), atol=1e-5)
    assert torch.equal(seen["cross.to_k"], text) and torch.equal(seen["cross.to_v"], text)
    assert not any(module._forward_pre_hooks for module in attentions.modules())  # gone after


def test_several_hypernetworks_apply_one_after_another_in_the_prompts_order(tmp_path):
    first_state, second_state = relu_file(seed=1), relu_file(seed=2)
    first = read_hypernetwork(write(tmp_path, "first", first_state))
    second = read_hypernetwork(write(tmp_path, "second", second_state))
    attentions = attention_pair(cross_width=WIDTH)
    seen, _ = projection_inputs(attentions)
    x = torch.randn(1, 4, WIDTH, generator=torch.Generator().manual_seed(5))
    text = torch.randn(1, 3, WIDTH, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), bent_attention([attentions], [(first, 0.5), (second, 1.5)]):
        attentions["cross"](x, encoder_hidden_states=text)
    expected = relu_expected(relu_expected(text, first_state[WIDTH][0], 0.5), second_state[WIDTH][0], 1.5)
    assert torch.allclose(seen["cross.to_k"], expected, atol=1e-5)


def test_the_networks_run_in_float32_and_hand_back_the_models_dtype(tmp_path):
    state = relu_file()
    network = read_hypernetwork(write(tmp_path, "bend", state))
    attentions = attention_pair().to(torch.bfloat16)
    seen, _ = projection_inputs(attentions)
    x = torch.randn(1, 4, WIDTH, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with torch.no_grad(), bent_attention([attentions], [(network, 1.0)]):
        attentions["self"](x)
    assert seen["self.to_k"].dtype == torch.bfloat16
    assert torch.equal(seen["self.to_k"], relu_expected(x.float(), state[WIDTH][0], 1.0).to(torch.bfloat16))


# --- in a job -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hypernet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hypernetworks")
    write(folder, "bend", relu_file())
    write(folder, "ln", norm_dropout_file())
    return folder


@pytest.fixture(scope="module")
def services(models_dir, hypernet_dir, tmp_path_factory):
    yield from running_services(models_dir, tmp_path_factory.mktemp("hn-out"), hypernetwork_dir=hypernet_dir)


def run(services, **fields):
    job = services.worker.submit(QUICK | fields)
    assert job.wait(120) and job.state is JobState.DONE, job.error
    return job


def pixels(job) -> np.ndarray:
    return np.asarray(job.images[0].image, np.int16)


def hooks_on(unet) -> int:
    return sum(len(module._forward_pre_hooks) for name, module in unet.named_modules()
               if name.endswith(("to_k", "to_v")))


def test_a_hypernetwork_changes_the_picture_multiplier_0_does_not_and_the_next_job_is_as_before(services):
    before = pixels(run(services))
    bent = run(services, prompt="a red apple <hypernet:bend>")
    assert np.abs(pixels(bent) - before).max() > 10
    assert np.array_equal(pixels(run(services, prompt="a red apple <hypernet:bend:0>")), before)
    assert hooks_on(services.engine.pipe.unet) == 0
    assert np.array_equal(pixels(run(services)), before)  # nothing left behind
    assert np.abs(pixels(run(services, prompt="a red apple <hypernet:ln:0.8>")) - before).max() > 10
    # No infotext key in A1111 1.x: the tag stays in the prompt, and pasting the prompt back brings it along.
    assert bent.images[0].infotext.startswith("a red apple <hypernet:bend>\n")
    assert "ypernet" not in bent.images[0].infotext.split("\n")[-1]


def test_the_hires_pass_runs_the_hypernetworks_of_its_own_prompt(services):
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 3, "denoising_strength": 0.9}
    plain = pixels(run(services, **hires))
    same = pixels(run(services, **hires, hr_prompt="a red apple "))  # its own text, no tag
    assert np.array_equal(plain, same)
    assert np.abs(pixels(run(services, **hires, hr_prompt="a red apple <hypernet:bend>")) - plain).max() > 10


def test_an_unknown_name_or_a_bad_multiplier_is_refused_before_the_queue(services):
    queued = services.worker.queue_length()
    for fields, says in (({"prompt": "x <hypernet:bnd>"}, "no hypernetwork named 'bnd'"),
                         ({"prompt": "x <hypernet:bend:strong>"}, "'strong' is not a number"),
                         ({"prompt": "x", "enable_hr": True, "hr_prompt": "y <hypernet:nope>"},
                          "hr_prompt: no hypernetwork named 'nope'")):
        with pytest.raises(HypernetworkError, match=says) as refused:
            services.worker.submit(QUICK | fields)
        if "bnd" in says:
            assert "hypernetworks there: bend, ln" in str(refused.value)
    assert services.worker.queue_length() == queued


def test_a_broken_file_fails_its_job_naming_the_file_and_the_worker_goes_on(services, hypernet_dir):
    (hypernet_dir / "broken.pt").write_bytes(b"not a pickle at all")
    try:
        job = services.worker.submit(QUICK | {"prompt": "a red apple <hypernet:broken>"})
        assert job.wait(120) and job.state is JobState.FAILED
        assert "hypernetwork broken (broken.pt) could not be read" in job.error
        assert hooks_on(services.engine.pipe.unet) == 0
        run(services)
    finally:
        (hypernet_dir / "broken.pt").unlink()


def test_the_api_lists_the_files_as_a1111_and_refuses_an_unknown_name(services, hypernet_dir):
    from webui.api import create_api_app

    with TestClient(create_api_app(services)) as client:
        assert client.get("/sdapi/v1/hypernetworks").json() == [{"name": name, "path": str(hypernet_dir / f"{name}.pt")}
                                                                for name in ("bend", "ln")]
        bad = client.post("/sdapi/v1/txt2img", json={"prompt": "a <hypernet:bnd:0.5>", "steps": 2})
        assert bad.status_code == 422 and "no hypernetwork named 'bnd'" in bad.json()["detail"], bad.text
        assert client.get("/sdapi/v1/cmd-flags").json()["hypernetwork_dir"] == str(hypernet_dir)


def test_the_cards_list_the_folder_and_a_click_adds_the_tag_at_the_weight(services, hypernet_dir):
    from webui.ui.blocks import create_ui
    from webui.ui.generation import GenerationActions

    actions = GenerationActions(services, models=None)
    lists = actions.file_lists()
    assert lists[6]["choices"] == ["bend", "ln"] and [caption for _, caption in lists[7]] == ["bend", "ln"]
    assert [caption for _, caption in actions.hypernetwork_cards("be")] == ["bend"]
    prompt, picked = actions.hypernetwork_card_picked("a cat", 0.6, "be", clicked(0, None))
    assert (prompt, picked) == ("a cat <hypernet:bend:0.6>", "bend")
    assert actions.hypernetwork_card_picked(prompt, 0.3, "", clicked(0, "bend"))[0] == "a cat <hypernet:bend:0.3>"
    assert actions.hypernetwork_card_picked("a cat", 1, "zzz", clicked(0, None)) == (gr.skip(), gr.skip())
    ui = create_ui(services)
    [wiring] = [fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", "") == "hypernetwork_card_picked"
                and fn.inputs[0].elem_id == "img2img_prompt"]
    assert [block.elem_id for block in wiring.inputs] == ["img2img_prompt", "img2img_hypernet_weight",
                                                          "img2img_hypernet_search"]
    assert [block.elem_id for block in wiring.outputs] == ["img2img_prompt", "img2img_hypernet_name"]


# --- another checkpoint taking over ---------------------------------------------------------------------------

def test_a_refiner_and_a_hires_checkpoint_that_take_over_get_the_hooks_and_leave_none(tmp_path_factory, hypernet_dir,
                                                                                       monkeypatch):
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("takeover-models")
    save_tiny_model(folder / TINY)
    save_tiny_model(folder / "tiny-refiner", seed=1)
    calls = []
    forward = UNet2DConditionModel.forward

    def spy(self, *args, **kwargs):
        calls.append(hooks_on(self))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    for services in running_services(folder, tmp_path_factory.mktemp("takeover-out"), hypernetwork_dir=hypernet_dir):
        attention_inputs = 2 * sum(name.endswith("attn1") or name.endswith("attn2")
                                   for name, _ in services.engine.pipe.unet.named_modules())
        run(services, prompt="a red apple <hypernet:bend>", steps=4, refiner_checkpoint="tiny-refiner",
            refiner_switch_at=0.5)
        run(services, prompt="a red apple <hypernet:bend>", enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2,
            denoising_strength=0.6, hr_checkpoint_name="tiny-refiner")
        assert len(calls) == 4 + 3 + 2 and calls == [attention_inputs] * len(calls)  # every call, every model
        assert services.engine.model.entry.name == TINY and hooks_on(services.engine.pipe.unet) == 0
