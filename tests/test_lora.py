"""LoRAs named in the prompt: the tag syntax, the LoRA folder, merging into the weights and taking them out."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.conftest import TINY
from webui.engine.lora import (LayerUpdate, LoraError, LoraFile, LoraLibrary, LoraPatcher, LoraUse, MAX_LORAS,
                               lora_uses, strip_loras, unread_tags)
from webui.schemas import GenerationRequest, InvalidRequest

# Layers of the tiny model (tests/tiny_sd.py) a LoRA changes: attention and a 3x3 convolution (LoCon) in
# the UNet, a query projection in the text encoder.
UNET_LAYERS = {"down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
               "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (32, 32),
               "down_blocks_0_resnets_0_conv1": (16, 16, 3, 3)}
TE_LAYERS = {"text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}
RANK, ALPHA = 2, 1.0


def lora_pairs(seed: int = 0) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(part, layer) -> (up, down), large enough to change the tiny model's picture."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for part, layers in (("unet", UNET_LAYERS), ("te", TE_LAYERS)):
        for layer, shape in layers.items():
            out_ch, in_ch, *kernel = shape
            down = torch.randn(RANK, in_ch, *kernel, generator=generator)
            up = torch.randn(out_ch, RANK, *([1, 1] if kernel else []), generator=generator)
            pairs[(part, layer)] = up, down
    return pairs


def kohya_state(pairs) -> dict[str, torch.Tensor]:
    state = {}
    for (part, layer), (up, down) in pairs.items():
        base = f"lora_{'unet' if part == 'unet' else 'te'}_{layer}"
        state |= {f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down, f"{base}.alpha": torch.tensor(ALPHA)}
    return state


def peft_state(pairs) -> dict[str, torch.Tensor]:
    """diffusers' own LoRA keys (PEFT): dotted module paths, lora_A/lora_B, alpha as its own key here."""
    dotted = {"down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
              "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
              "down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1",
              "text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj"}
    state = {}
    for (part, layer), (up, down) in pairs.items():
        base = f"{'unet' if part == 'unet' else 'text_encoder'}.{dotted[layer]}"
        state |= {f"{base}.lora_B.weight": up, f"{base}.lora_A.weight": down, f"{base}.alpha": torch.tensor(ALPHA)}
    return state


def write_lora(folder, name: str, state: dict, metadata: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def lora_engine(models_dir, tmp_path_factory):
    from webui.config import Settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry

    lora_dir = tmp_path_factory.mktemp("Lora")
    write_lora(lora_dir, "detail", kohya_state(lora_pairs()))
    settings = Settings(models_dir=models_dir, device="cpu", lora_dir=lora_dir)
    engine = Engine(settings, ModelRegistry(models_dir, tmp_path_factory.mktemp("cache") / "hashes.json"))
    engine.load(TINY)
    return engine


def pictures(engine, prompt: str, seeds=(3,)) -> np.ndarray:
    request = GenerationRequest(prompt=prompt, steps=3)
    return np.stack([np.asarray(r.image, dtype=np.int16) for r in engine.generate(request, list(seeds))])


# --- the tag ------------------------------------------------------------------------------

def test_tags_leave_the_prompt_and_give_their_multipliers():
    prompt = "a cat <lora:detail>, [sunny:<lora:style:0.5:0.25>:4] <lora:more:te=0.3:unet=0.7>"
    text, uses = strip_loras(prompt), lora_uses(prompt)
    assert text == "a cat , [sunny::4] "
    assert uses == [LoraUse("detail", 1.0, 1.0), LoraUse("style", 0.5, 0.25), LoraUse("more", 0.3, 0.7)]
    assert lora_uses("<lora:a:0.4> <lora:a:0.4:0.1>") == [LoraUse("a", 0.8, 0.5)]  # twice: they add up
    assert strip_loras("x <lora:bad:zz> y") == "x  y" and strip_loras("no tags") == "no tags"


def test_tags_read_as_a1111_reads_them_lyco_dyn_and_other_types():
    """A1111 takes every <type:...> tag out of the text; <lyco:> is its older name for a LoRA, and the third
    value (or dyn=) a DyLoRA rank, accepted and not used here. <hypernet:...> is read elsewhere (hypernetworks.py);
    an extension's type is not read here at all."""
    prompt = "a cat <lyco:ink:0.5> <lora:detail:1:0.5:8> <lora:more:dyn=4> <hypernet:old:1> <lora:>"
    text, uses = strip_loras(prompt), lora_uses(prompt)
    assert uses == [LoraUse("ink", 0.5, 0.5), LoraUse("detail", 1.0, 0.5), LoraUse("more", 1.0, 1.0)]
    assert text == "a cat     <lora:>"  # <lora:> has no name: not a tag to A1111 either, so it stays text
    assert unread_tags("a <hypernet:old:1> <lora:x> <lyco:y> <wildcard:hair>") == ["<wildcard:hair>"]


@pytest.mark.parametrize("prompt, says", [
    ("<lora: >", "names no LoRA"), ("<lora::0.5>", "names no LoRA"), ("<lora:a:lots>", "'lots' is not a number"),
    ("<lora:a:nan>", "between -10 and 10"), ("<lora:a:11>", "between -10 and 10"),
    ("<lora:a:1:1:8:1>", "has 4 values"), ("<lora:a:rank=3>", "unknown setting 'rank'"),
    (" ".join(f"<lora:n{i}>" for i in range(MAX_LORAS + 1)), f"use at most {MAX_LORAS}"),
])
def test_a_malformed_tag_says_what_to_write(prompt, says):
    with pytest.raises(LoraError, match=says):
        lora_uses(prompt)


# --- the folder ---------------------------------------------------------------------------

def test_the_library_finds_files_in_subfolders_and_names_the_others_when_one_is_missing(tmp_path):
    write_lora(tmp_path / "Lora", "detail", {"x": torch.zeros(1)})
    write_lora(tmp_path / "Lora" / "styles", "ink", {"x": torch.zeros(1)})
    (tmp_path / "Lora" / "notes.txt").write_text("not a LoRA")
    library = LoraLibrary(tmp_path / "Lora")
    assert sorted(entry.name for entry in library.entries()) == ["detail", "ink"]
    assert library.find("ink").path == tmp_path / "Lora" / "styles" / "ink.safetensors"
    with pytest.raises(LoraError, match=r"no LoRA named 'dtail' in .*LoRAs there: detail, ink"):
        library.find("dtail")
    write_lora(tmp_path / "Lora", "late", {"x": torch.zeros(1)})  # added while the server runs
    assert library.find("late").name == "late"
    assert LoraLibrary(tmp_path / "missing").entries() == []


def test_a_lora_is_found_by_its_trainer_name_and_at_any_depth(tmp_path):
    """Prompts pasted from A1111 may name a LoRA by its alias (ss_output_name), which A1111's cards insert."""
    write_lora(tmp_path, "add_detail_v2", {"x": torch.zeros(1)}, metadata={"ss_output_name": "add_detail"})
    write_lora(tmp_path, "a", {"x": torch.zeros(1)}, metadata={"ss_output_name": "shared"})
    write_lora(tmp_path, "b", {"x": torch.zeros(1)}, metadata={"ss_output_name": "shared"})
    write_lora(tmp_path / "one" / "two" / "three", "deep", {"x": torch.zeros(1)})
    (tmp_path / "one" / "loop").symlink_to(tmp_path, target_is_directory=True)  # a link back up ends, not loops
    library = LoraLibrary(tmp_path)
    assert library.find("add_detail").name == "add_detail_v2"
    assert library.find("deep").path == tmp_path / "one" / "two" / "three" / "deep.safetensors"
    with pytest.raises(LoraError, match="no LoRA named 'shared'"):  # two files claim it: neither is guessed
        library.find("shared")


def test_damaged_or_half_downloaded_files_list_without_metadata_or_hash(tmp_path):
    (tmp_path / "downloading.safetensors").write_bytes(b"")
    header = b'[1, 2]'
    (tmp_path / "odd.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    library = LoraLibrary(tmp_path)
    assert sorted(entry.name for entry in library.entries()) == ["downloading", "odd"]
    for entry in library.entries():
        assert library.metadata(entry) == {}
    assert library.short_hash(library.find("downloading")) is None
    write_lora(tmp_path, "tagged", {"x": torch.zeros(1)},
               metadata={"ss_tag_frequency": '{"cats": {"cat": 3}}', "ssmd_cover_images": "[\"QUFB\"]"})
    assert LoraLibrary(tmp_path).metadata(LoraLibrary(tmp_path).find("tagged")) == {"ss_tag_frequency": {"cats": {"cat": 3}}}


def test_the_short_hash_is_a1111s_hash_of_the_tensor_data_after_the_header(tmp_path):
    path = write_lora(tmp_path, "detail", {"x": torch.arange(6.0)}, metadata={"ss_output_name": "detail"})
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    library = LoraLibrary(tmp_path)
    entry = library.find("detail")
    assert library.short_hash(entry) == hashlib.sha256(raw[8 + header:]).hexdigest()[:12]
    assert library.metadata(entry) == {"ss_output_name": "detail"}
    # Other metadata, same tensors: the same hash (why A1111 hashes after the header).
    write_lora(tmp_path, "detail", {"x": torch.arange(6.0)}, metadata={"ss_output_name": "renamed"})
    assert library.short_hash(library.find("detail")) == hashlib.sha256(raw[8 + header:]).hexdigest()[:12]


# --- merging ------------------------------------------------------------------------------

def test_merging_adds_the_scaled_product_to_each_layer_and_restoring_gives_the_weights_back(lora_engine):
    pipe = lora_engine.pipe
    layers = {"unet": dict(pipe.unet.named_modules()), "te": dict(pipe.text_encoder.named_modules())}
    # transformers 5's CLIPTextModel has no text_model level, which LoRA files name
    dotted = {part: {name.replace(".", "_"): name for name in modules} for part, modules in layers.items()}
    dotted["te"] |= {"text_model_" + flat: name for flat, name in dotted["te"].items()}
    before = {key: layers[key[0]][dotted[key[0]][key[1]]].weight.detach().clone() for key in lora_pairs()}
    patcher = LoraPatcher()
    patcher.use(pipe, [(lora_engine.loras.find("detail"), LoraUse("detail", 0.5, 2.0))])
    for (part, layer), (up, down) in lora_pairs().items():
        weight = layers[part][dotted[part][layer]].weight
        multiplier = 2.0 if part == "unet" else 0.5
        expected = before[(part, layer)] + multiplier * ALPHA / RANK * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        assert torch.allclose(weight, expected, atol=1e-5), (part, layer)
    patcher.restore()
    for (part, layer) in lora_pairs():
        assert torch.equal(layers[part][dotted[part][layer]].weight, before[(part, layer)])


def test_diffusers_keys_merge_as_kohya_keys_do(lora_engine, tmp_path):
    write_lora(tmp_path, "peft", peft_state(lora_pairs()))
    kohya = pictures(lora_engine, "a red apple <lora:detail:0.8>")
    library, lora_engine.loras = lora_engine.loras, LoraLibrary(tmp_path)
    try:
        assert np.abs(pictures(lora_engine, "a red apple <lora:peft:0.8>") - kohya).max() <= 1
    finally:
        lora_engine.loras = library


def test_a_lora_changes_the_picture_and_leaves_no_trace_in_the_next_run(lora_engine):
    plain = pictures(lora_engine, "a red apple")
    with_lora = pictures(lora_engine, "a red apple <lora:detail:1>")
    assert np.abs(with_lora - plain).mean() > 2, "the LoRA changed nothing"
    assert np.array_equal(pictures(lora_engine, "a red apple <lora:detail:0>"), plain)  # the tag is not read as text
    assert np.array_equal(pictures(lora_engine, "a red apple"), plain)  # restored exactly
    only_text = pictures(lora_engine, "a red apple <lora:detail:1:0>")  # text encoder alone
    assert np.abs(only_text - plain).mean() > 0 and not np.array_equal(only_text, with_lora)


@pytest.mark.parametrize("state, says", [
    ({"lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2),
      "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4)}, "a layer this model does not have"),
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(64, 2),
      "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 64)},
     "does not fit layer"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(16, 2)}, "lacks lora_down.weight"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(16, 2)}, "lacks hada_w1_b.*not a LoHa"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.dora_scale": torch.zeros(1, 16)}, "DoRA"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.oft_blocks": torch.zeros(4, 4, 4)}, "OFT"),
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(4, 2),
      "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 4)},
     "made for SDXL .it changes a second text encoder.; this model is SD 1.x/2.x"),
    ({"emb_params": torch.zeros(4, 32)}, "no layers this server reads"),
])
def test_a_lora_that_does_not_fit_is_refused_and_the_weights_stay_as_loaded(lora_engine, tmp_path, state, says):
    # Good layers first where the bad one fails at merge time: they must come out again.
    good = kohya_state(lora_pairs()) if says in ("a layer this model does not have", "does not fit layer") else {}
    write_lora(tmp_path, "odd", good | state)
    plain = pictures(lora_engine, "a red apple")
    library, lora_engine.loras = lora_engine.loras, LoraLibrary(tmp_path)
    try:
        with pytest.raises(LoraError, match=says) as refused:
            pictures(lora_engine, "a red apple <lora:odd>")
        assert isinstance(refused.value, InvalidRequest)  # the worker refuses the job; it does not crash
        assert np.array_equal(pictures(lora_engine, "a red apple"), plain)  # nothing half-merged left behind
    finally:
        lora_engine.loras = library


# --- LyCORIS: LoHa, LoKr and Tucker-decomposed LoCon ------------------------------------------------

def merged_delta(pieces: dict, weight_shape: tuple, multiplier: float = 1.0) -> np.ndarray:
    """What merging one layer's pieces adds to a weight of weight_shape."""
    weight = torch.nn.Parameter(torch.randn(weight_shape), requires_grad=False)
    before = weight.detach().clone()
    LoraPatcher()._add(LoraFile("lyco", Path("lyco.safetensors")), LayerUpdate("unet", "layer", pieces), weight,
                       multiplier)
    return (weight.detach() - before).numpy()


def tucker_kernel(core, a, b) -> np.ndarray:
    """A Tucker-decomposed kernel, summed out loop by loop: core (r, r', k, k), a (r, out), b (r', in)."""
    core, a, b = core.numpy(), a.numpy(), b.numpy()
    kernel = np.zeros((a.shape[1], b.shape[1], *core.shape[2:]))
    for i in range(core.shape[0]):
        for j in range(core.shape[1]):
            kernel += np.multiply.outer(np.outer(a[i], b[j]), core[i, j])
    return kernel


def test_a_loha_layer_adds_the_product_of_its_two_low_rank_updates():
    w1a, w1b, w2a, w2b = torch.randn(8, 2), torch.randn(2, 6), torch.randn(8, 2), torch.randn(2, 6)
    delta = merged_delta({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                          "alpha": torch.tensor(1.0)}, (8, 6), multiplier=0.7)
    expected = 0.7 * 0.5 * (w1a.numpy() @ w1b.numpy()) * (w2a.numpy() @ w2b.numpy())  # alpha 1 / rank 2
    assert np.allclose(delta, expected, atol=1e-5)


def test_a_loha_convolution_with_tucker_cores_adds_the_product_of_its_two_kernels():
    t1, t2 = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    w1a, w1b, w2a, w2b = torch.randn(2, 8), torch.randn(2, 6), torch.randn(2, 8), torch.randn(2, 6)
    delta = merged_delta({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "hada_t1": t1,
                          "hada_t2": t2, "alpha": torch.tensor(4.0)}, (8, 6, 3, 3))
    expected = 2.0 * tucker_kernel(t1, w1a, w1b) * tucker_kernel(t2, w2a, w2b)  # alpha 4 / rank 2
    assert np.allclose(delta, expected, atol=1e-4)


@pytest.mark.parametrize("second", ["full kernel", "low rank", "tucker core"])
def test_a_lokr_convolution_scales_each_block_of_channels_by_the_small_factor(second):
    """LoKr's Kronecker product: output channel a*4+b, input channel c*3+d take w1[a, c] times w2's kernel (b, d)."""
    w1, kernel = torch.randn(2, 2), torch.randn(4, 3, 3, 3)
    pieces = {"lokr_w1": w1, "alpha": torch.tensor(4.0)}
    if second == "full kernel":
        pieces["lokr_w2"], scale = kernel, 1.0  # no rank to divide alpha by: A1111 scales by 1
    elif second == "low rank":
        w2a, w2b = torch.randn(4, 2), torch.randn(2, 27)
        pieces |= {"lokr_w2_a": w2a, "lokr_w2_b": w2b}
        kernel, scale = (w2a @ w2b).reshape(4, 3, 3, 3), 2.0  # alpha 4 / rank 2
    else:  # with a Tucker core, w2_a is (rank, out) and w2_b (rank, in)
        t2, w2a, w2b = torch.randn(2, 2, 3, 3), torch.randn(2, 4), torch.randn(2, 3)
        pieces |= {"lokr_t2": t2, "lokr_w2_a": w2a, "lokr_w2_b": w2b}
        kernel, scale = torch.from_numpy(tucker_kernel(t2, w2a, w2b)).float(), 2.0
    delta = merged_delta(pieces, (8, 6, 3, 3))
    expected = np.zeros((8, 6, 3, 3))
    for a in range(2):
        for b in range(4):
            for c in range(2):
                for d in range(3):
                    expected[a * 4 + b, c * 3 + d] = scale * w1[a, c].item() * kernel[b, d].numpy()
    assert np.allclose(delta, expected, atol=1e-4)


def test_a_tucker_locon_acts_as_its_three_convolutions_in_a_row():
    down, mid, up = torch.randn(2, 6, 1, 1), torch.randn(2, 2, 3, 3), torch.randn(8, 2, 1, 1)
    delta = merged_delta({"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up,
                          "alpha": torch.tensor(1.0)}, (8, 6, 3, 3))
    x = torch.randn(1, 6, 9, 9)
    in_a_row = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * 0.5  # alpha 1 / rank 2
    assert torch.allclose(F.conv2d(x, torch.from_numpy(delta), padding=1), in_a_row, atol=1e-4)


def test_loha_and_lokr_files_change_the_picture_and_come_out_again(lora_engine, tmp_path):
    generator = torch.Generator().manual_seed(1)
    loha = {}
    for layer, (out_features, in_features) in [(name, shape) for name, shape in UNET_LAYERS.items() if len(shape) == 2]:
        base = f"lora_unet_{layer}"
        loha |= {f"{base}.hada_w1_a": torch.randn(out_features, 2, generator=generator),
                 f"{base}.hada_w1_b": torch.randn(2, in_features, generator=generator),
                 f"{base}.hada_w2_a": torch.randn(out_features, 2, generator=generator),
                 f"{base}.hada_w2_b": torch.randn(2, in_features, generator=generator),
                 f"{base}.alpha": torch.tensor(2.0)}
    write_lora(tmp_path, "loha", loha)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    write_lora(tmp_path, "lokr", {f"{te}.lokr_w1": torch.randn(4, 4, generator=generator),
                                  f"{te}.lokr_w2": torch.randn(8, 8, generator=generator)})
    plain = pictures(lora_engine, "a red apple")
    library, lora_engine.loras = lora_engine.loras, LoraLibrary(tmp_path)
    try:
        for name in ("loha", "lokr"):
            changed = pictures(lora_engine, f"a red apple <lora:{name}:1>")
            assert np.abs(changed - plain).mean() > 1, name
            assert np.array_equal(pictures(lora_engine, "a red apple"), plain)  # taken out again
    finally:
        lora_engine.loras = library


def test_a_damaged_file_is_named_with_what_to_do(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(LoraError, match=r"cut.*could not be read.*download it again"):
        LoraPatcher().use(object(), [(LoraFile("cut", tmp_path / "cut.safetensors"), LoraUse("cut", 1, 1))])


def test_lora_hashes_leave_out_separators_and_unhashable_files(lora_engine, tmp_path):
    """A1111 splits "Lora hashes" at "," and ":" when it reads an infotext back: a name holding them would break it."""
    write_lora(tmp_path, "style, ink", kohya_state(lora_pairs()))
    (tmp_path / "downloading.safetensors").write_bytes(b"")
    library, lora_engine.loras = lora_engine.loras, LoraLibrary(tmp_path)
    try:
        request = GenerationRequest(prompt="<lora:style, ink> <lora:downloading>", steps=3)
        digest = lora_engine.loras.short_hash(lora_engine.loras.find("style, ink"))
        assert lora_engine.lora_hashes(request) == f"style ink: {digest}"
    finally:
        lora_engine.loras = library


def test_releasing_the_model_lets_go_of_the_kept_weights(models_dir, tmp_path):
    """Dropping the pipeline (unload-checkpoint of a compiled model, a model switch on the CPU) must not leave
    the LoRA's kept originals holding its layers, nor a record of LoRAs merged into weights that are gone."""
    import gc
    import weakref

    from webui.config import Settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry

    write_lora(tmp_path / "Lora", "detail", kohya_state(lora_pairs()))
    engine = Engine(Settings(models_dir=models_dir, device="cpu", lora_dir=tmp_path / "Lora"),
                    ModelRegistry(models_dir, tmp_path / "hashes.json"))
    engine.load(TINY)
    plain = pictures(engine, "a red apple")
    pictures(engine, "a red apple <lora:detail>")
    layer = weakref.ref(engine.pipe.unet.down_blocks[0].resnets[0].conv1.weight)
    assert engine.release_device() and engine.pipe is None  # on a CPU the weights have nowhere to park: dropped
    gc.collect()
    assert layer() is None, "the LoRA's kept originals hold the dropped model's layers"
    engine.restore_device()  # as the worker does before the next image: read again from disk
    assert np.array_equal(pictures(engine, "a red apple"), plain)
    assert np.abs(pictures(engine, "a red apple <lora:detail>") - plain).mean() > 2  # merged again, not skipped


def test_the_token_counter_and_prompt_phases_ignore_the_tags(lora_engine):
    assert lora_engine.count_tokens("a red apple <lora:detail:0.7>") == lora_engine.count_tokens("a red apple")
    request = GenerationRequest(prompt="a red apple <lora:detail>", steps=3)
    assert lora_engine.lora_hashes(request) == f"detail: {lora_engine.loras.short_hash(lora_engine.loras.find('detail'))}"
    assert lora_engine.lora_hashes(GenerationRequest(prompt="a red apple", steps=3)) is None


def test_a_folder_lists_one_file_per_name_and_says_which_it_left_out(tmp_path, caplog):
    from webui.engine.models import files_by_name

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for path in (tmp_path / "a" / "style.safetensors", tmp_path / "b" / "style.safetensors", tmp_path / "None.pt",
                 tmp_path / "other.pt"):
        path.write_bytes(b"x")
    files = files_by_name(tmp_path, (".safetensors", ".pt"), "LoRAs", left_out=("None",))
    assert sorted(files) == ["other", "style"]
    kept = files["style"]
    assert kept.parent.name in ("a", "b") and "two LoRAs are named style" in caplog.text
    assert str(kept) in caplog.text.split(" is used")[0]  # the message names the one kept first
