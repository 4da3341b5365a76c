"""Textual inversion embeddings on SDXL models, as A1111 reads them: a .safetensors with "clip_l" vectors for the first
text encoder and "clip_g" for the second, both read where a prompt names the file. Checked against the same vectors put
into the token tables by hand, on a tiny random SDXL (tests/tiny_sdxl.py: CLIP-L 24 wide, bigG 40 wide)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from tests.conftest import TINY
from tests.helpers import finished_job, running_services
from tests.tiny_sdxl import CLIP_G_WIDTH, CLIP_L_WIDTH, save_tiny_sdxl_model
from webui.config import Settings
from webui.engine.generate import Engine
from webui.engine.models import ModelRegistry
from webui.engine.prompts import _split, encode_sdxl_pair
from webui.schemas import GenerationRequest

XL = "tiny-xl"
NAME = "glossy"  # the SDXL embedding, two vectors
BY_HAND = ("zebra", "kangaroo")  # two words of one token each, whose rows the reference model gets instead


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 3


def write_sdxl_embedding(folder, name: str, clip_l: torch.Tensor, clip_g: torch.Tensor):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(folder / f"{name}.safetensors"))
    return folder / f"{name}.safetensors"


CLIP_L, CLIP_G = vectors(2, CLIP_L_WIDTH, 1), vectors(2, CLIP_G_WIDTH, 2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny SDXL model, and an embeddings folder: glossy, and the misfits (an SD 1.x file as wide as CLIP-L,
    an SDXL file whose clip_g is too narrow, one whose two tensors hold different counts)."""
    models = tmp_path_factory.mktemp("xl-models")
    save_tiny_sdxl_model(models / XL)
    embeddings = tmp_path_factory.mktemp("xl-embeddings")
    write_sdxl_embedding(embeddings, NAME, CLIP_L, CLIP_G)
    torch.save({"string_to_param": {"*": vectors(1, CLIP_L_WIDTH, 3)}, "name": "matte", "step": 10},
               embeddings / "matte.pt")
    write_sdxl_embedding(embeddings, "narrow", vectors(1, CLIP_L_WIDTH, 4), vectors(1, 32, 5))
    write_sdxl_embedding(embeddings, "uneven", vectors(2, CLIP_L_WIDTH, 6), vectors(3, CLIP_G_WIDTH, 7))
    return models, embeddings


def make_engine(models, embeddings, tmp_path, model=XL) -> Engine:
    engine = Engine(Settings(models_dir=models, device="cpu", embeddings_dir=embeddings),
                    ModelRegistry(models, tmp_path / "hashes.json"))
    engine.load(model)
    return engine


@pytest.fixture(scope="module")
def engine(folders, tmp_path_factory):
    return make_engine(*folders, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def by_hand(folders, tmp_path_factory):
    """The same model without embeddings, the rows of the words BY_HAND holding the file's vectors instead."""
    models, _ = folders
    engine = make_engine(models, tmp_path_factory.mktemp("no-embeddings"), tmp_path_factory.mktemp("cache"))
    ids = [engine.pipe.tokenizer(word, add_special_tokens=False).input_ids for word in BY_HAND]
    assert all(len(word_ids) == 1 for word_ids in ids)
    rows = [word_ids[0] for word_ids in ids]
    with torch.no_grad():
        engine.pipe.text_encoder.get_input_embeddings().weight[rows] = CLIP_L
        engine.pipe.text_encoder_2.get_input_embeddings().weight[rows] = CLIP_G
    return engine, rows


def hand_text(text: str) -> str:
    return text.replace(NAME, " ".join(BY_HAND))


def test_the_vectors_become_new_rows_of_both_text_encoders_at_the_same_ids(engine, by_hand):
    hand, hand_rows = by_hand
    embedding = engine.embeddings.loaded[NAME]
    vocabulary = len(engine.pipe.tokenizer)
    assert embedding.vector_ids == (vocabulary, vocabulary + 1)  # past the vocabulary, in both tables
    first = engine.pipe.text_encoder.get_input_embeddings().weight
    second = engine.pipe.text_encoder_2.get_input_embeddings().weight
    assert torch.equal(first[list(embedding.vector_ids)], CLIP_L)
    assert torch.equal(second[list(embedding.vector_ids)], CLIP_G)
    kept = [row for row in range(vocabulary) if row not in hand_rows]  # the model's own rows are untouched
    assert torch.equal(first[kept], hand.pipe.text_encoder.get_input_embeddings().weight[kept])
    assert torch.equal(second[kept], hand.pipe.text_encoder_2.get_input_embeddings().weight[kept])
    assert engine.count_tokens(f"a cat, {NAME}") == engine.count_tokens("a cat,") + 2


@pytest.mark.parametrize("prompt, negative", [
    (f"a red apple, {NAME}", "blurry"),
    (f"a red ({NAME}:1.3) apple", "blurry"),  # weighted, each encoder's half on its own
    ("a red apple", f"blurry, {NAME}"),
    ("red " * 74 + NAME, "blurry"),  # no room left in the first chunk: the embedding goes whole to the second
], ids=["prompt", "weighted", "negative", "chunk-end"])
def test_a_prompt_naming_it_is_conditioned_as_with_the_vectors_put_in_by_hand(engine, by_hand, prompt, negative):
    """Both encoders' halves, and the pooled vector too (read at the end marker, not at the embedding's ids, which
    are higher than the end marker's)."""
    hand, _ = by_hand
    hand_prompt = hand_text(prompt).replace("red " * 74, "red " * 74 + "BREAK ")  # by hand: where the chunk ends
    with torch.no_grad():
        ours = encode_sdxl_pair(engine.pipe, [prompt], [negative])
        theirs = encode_sdxl_pair(hand.pipe, [hand_prompt], [hand_text(negative)])
        without = encode_sdxl_pair(engine.pipe, [prompt.replace(NAME, "")], [negative.replace(NAME, "")])
    for mine, reference in zip(ours, theirs):  # prompt, negative, pooled prompt, pooled negative
        assert mine.shape == reference.shape and torch.allclose(mine, reference, atol=1e-5)
    assert any(mine.shape != plain.shape or not torch.allclose(mine, plain) for mine, plain in zip(ours, without))


def test_both_tokenizers_cut_a_long_prompt_into_the_same_chunks(engine):
    text = "red " * 74 + NAME + ", blue" * 20
    chunks = _split(engine.pipe.tokenizer, text)
    assert chunks == _split(engine.pipe.tokenizer_2, text)
    assert [len(ids) for ids, _ in chunks] == [74, 42]  # the embedding's two vectors do not fit after 74 tokens
    assert tuple(chunks[1][0][:2]) == engine.embeddings.loaded[NAME].vector_ids


def test_the_picture_is_the_one_the_vectors_put_in_by_hand_make(engine, by_hand):
    hand, _ = by_hand

    def picture(model, prompt):
        request = GenerationRequest(prompt=prompt, negative_prompt="blurry", steps=2)
        return np.asarray(model.generate(request, [3])[0].image, np.int16)

    ours = picture(engine, f"a red apple, {NAME}")
    assert np.abs(ours - picture(hand, hand_text(f"a red apple, {NAME}"))).max() <= 1
    assert np.abs(ours - picture(engine, "a red apple,")).mean() > 0.5


def test_files_that_do_not_fit_an_sdxl_model_are_skipped_with_the_reason(engine, by_hand):
    found = engine.embeddings
    assert NAME in found.loaded and sorted(found.skipped) == ["matte", "narrow", "uneven"]
    assert "made for SD 1.x/2.x (one text encoder, 24 wide); this SDXL model reads SDXL embeddings" in \
        found.skipped["matte"].skipped
    assert "its clip_g is 32 wide; this model's is 40 wide" in found.skipped["narrow"].skipped
    assert "its clip_l holds 2 vectors and its clip_g 3" in found.skipped["uneven"].skipped
    with torch.no_grad():  # a skipped name is read as words, as without embeddings
        ours = encode_sdxl_pair(engine.pipe, ["a matte uneven apple"], ["blurry"])
        theirs = encode_sdxl_pair(by_hand[0].pipe, ["a matte uneven apple"], ["blurry"])
    assert all(torch.equal(mine, reference) for mine, reference in zip(ours, theirs))


def test_an_sdxl_embedding_is_skipped_on_an_sd_model_with_the_reason(folders, models_dir, tmp_path):
    sd = make_engine(models_dir, folders[1], tmp_path, model=TINY)
    assert sd.embeddings.loaded == {}
    assert "an SDXL embedding (clip_l and clip_g); this model is SD 1.x/2.x, with one text encoder 32 wide" in \
        sd.embeddings.skipped[NAME].skipped
    assert sd.embeddings.skipped[NAME].summary["shape"] == CLIP_L_WIDTH + CLIP_G_WIDTH


def test_ti_hashes_name_an_sdxl_embedding(engine):
    digest = hashlib.sha256(engine.embeddings.loaded[NAME].path.read_bytes()).hexdigest()[:12]
    assert engine.ti_hashes(GenerationRequest(prompt="a cat", negative_prompt=f"({NAME}:1.2)")) == f"{NAME}: {digest}"
    assert engine.ti_hashes(GenerationRequest(prompt="a cat, matte")) is None


def test_a_refresh_gives_a_new_file_rows_after_the_others_in_both_encoders(engine):
    folder = engine.settings.embeddings_folder
    clip_l, clip_g = vectors(3, CLIP_L_WIDTH, 8), vectors(3, CLIP_G_WIDTH, 9)
    path = write_sdxl_embedding(folder, "fresh", clip_l, clip_g)
    try:
        found = engine.refresh_embeddings()
        ids = list(found.loaded["fresh"].vector_ids)
        assert ids[0] == engine.embeddings.loaded[NAME].vector_ids[-1] + 1 and len(ids) == 3
        assert torch.equal(engine.pipe.text_encoder.get_input_embeddings().weight[ids], clip_l)
        assert torch.equal(engine.pipe.text_encoder_2.get_input_embeddings().weight[ids], clip_g)
        assert engine.count_tokens("fresh") == 3
    finally:
        path.unlink()


def test_the_api_lists_them_and_a_job_writes_the_ti_hash_into_infotext_and_history(folders, tmp_path_factory):
    from webui.api import create_api_app

    models, embeddings = folders
    for services in running_services(models, tmp_path_factory.mktemp("out"), ckpt=XL, embeddings_dir=embeddings):
        with TestClient(create_api_app(services)) as client:
            listed = client.get("/sdapi/v1/embeddings").json()
            assert listed["loaded"] == {NAME: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                               "shape": CLIP_L_WIDTH + CLIP_G_WIDTH, "vectors": 2}}
            assert listed["skipped"]["matte"]["shape"] == CLIP_L_WIDTH and set(listed["skipped"]) == {
                "matte", "narrow", "uneven"}
            body = {"prompt": f"a red apple, {NAME}", "steps": 2, "seed": 1, "width": 64, "height": 64}
            info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        digest = hashlib.sha256((embeddings / f"{NAME}.safetensors").read_bytes()).hexdigest()[:12]
        assert f'TI hashes: "{NAME}: {digest}"' in info["infotexts"][0]
        job = finished_job(services, {"prompt": f"a cat, {NAME}", "steps": 2, "seed": 2})
        assert f'TI hashes: "{NAME}: {digest}"' in job.images[0].infotext
        assert f'TI hashes: "{NAME}: {digest}"' in services.history.get_image(job.images[0].history_id).infotext


def test_creating_or_training_an_embedding_on_an_sdxl_model_is_refused(engine):
    from types import SimpleNamespace

    from webui.engine.textual_inversion import init_vectors
    from webui.engine.training import TrainingError, prepare

    with pytest.raises(TrainingError, match="SDXL model, which cannot create or train embeddings yet"):
        init_vectors(engine.pipe, "red apple", 2)
    with pytest.raises(TrainingError, match="SDXL model, which cannot train embeddings yet"):
        prepare(engine, SimpleNamespace(kind="embedding"))


def test_an_sdxl_refiner_gets_the_clip_g_vectors_in_its_one_text_encoder(folders):
    from tests.tiny_sdxl import make_tiny_sdxl_refiner_pipeline
    from webui.engine.embeddings import load_embeddings

    refiner = make_tiny_sdxl_refiner_pipeline()
    plain = encode_sdxl_pair(refiner, [f"a {NAME} cat"], [""])[0]
    loaded = load_embeddings(refiner, folders[1])
    embedding = loaded.loaded[NAME]
    table = refiner.text_encoder_2.get_input_embeddings().weight
    assert torch.equal(table[list(embedding.vector_ids)], CLIP_G)  # bigG's rows hold clip_g
    assert "matte" in loaded.skipped  # an SD 1.x file, as on the base
    named = encode_sdxl_pair(refiner, [f"a {NAME} cat"], [""])[0]
    assert named.shape == plain.shape and not torch.equal(named, plain)  # the name now reads the vectors
