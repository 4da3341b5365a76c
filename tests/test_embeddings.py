"""Textual inversion embeddings named in prompts by file name, read from the three formats A1111 users have."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import TINY
from webui.schemas import GenerationRequest

WIDTH = 32  # the tiny model's text encoder (tests/tiny_sd.py)


def vectors(count: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 3


def write_a1111_pt(folder, name: str, vecs: torch.Tensor):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs}, "name": name, "step": 500,
                "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, folder / f"{name}.pt")
    return folder / f"{name}.pt"


def write_embeddings(folder):
    """badhands: 2 vectors (.pt); shiny: 1 vector (.safetensors); learned: diffusers' .bin; then the misfits."""
    write_a1111_pt(folder, "badhands", vectors(2, 1))
    save_file({"emb_params": vectors(1, 2)}, str(folder / "shiny.safetensors"))
    torch.save({"<learned>": vectors(1, 3)[0]}, folder / "learned.bin")
    write_a1111_pt(folder, "sd2only", vectors(1, 4, width=1024))
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(folder / "alora.safetensors"))
    (folder / "broken.pt").write_bytes(b"not a pickle")


def make_engine(models_dir, tmp_path, embeddings_dir):
    from webui.config import Settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry

    settings = Settings(models_dir=models_dir, device="cpu", embeddings_dir=embeddings_dir)
    engine = Engine(settings, ModelRegistry(models_dir, tmp_path / "hashes.json"))
    engine.load(TINY)
    return engine


@pytest.fixture(scope="module")
def engine(models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    write_embeddings(folder)
    return make_engine(models_dir, tmp_path_factory.mktemp("cache"), folder)


def picture(engine, prompt: str, negative: str = "") -> np.ndarray:
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, steps=3)
    return np.asarray(engine.generate(request, [5])[0].image, dtype=np.int16)


def test_each_format_loads_and_misfits_are_skipped_with_the_reason(engine):
    found = engine.embeddings
    assert sorted(found.loaded) == ["badhands", "learned", "shiny"]
    assert found.loaded["badhands"].summary == {"step": 500, "sd_checkpoint": "cc6cb27103",
                                                "sd_checkpoint_name": "v1-5-pruned-emaonly", "shape": 32, "vectors": 2}
    assert "1024 wide" in found.skipped["sd2only"].skipped
    assert list(found.skipped) == ["sd2only"]  # a LoRA or a broken file is no embedding: logged, not listed


def test_an_early_trainers_parameter_dict_file_loads(tmp_path):
    """The first textual inversion code saved its vectors in a ParameterDict; A1111 reads those too."""
    from webui.engine.embeddings import read_embedding

    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(4, 5))})
    torch.save({"string_to_param": params, "name": "old"}, tmp_path / "old.pt")
    embedding = read_embedding(tmp_path / "old.pt")
    assert embedding.skipped is None and torch.equal(embedding.vectors, vectors(4, 5))


def test_the_name_becomes_the_vectors_in_the_text_encoder(engine):
    """Each vector is a row of the token table, and the name reads as all of them: two tokens for badhands."""
    table = engine.pipe.text_encoder.get_input_embeddings().weight
    assert torch.allclose(table[list(engine.embeddings.loaded["badhands"].vector_ids)], vectors(2, 1))
    assert engine.count_tokens("a cat, badhands") == engine.count_tokens("a cat,") + 2
    assert engine.count_tokens("a cat, BadHands") == engine.count_tokens("a cat, badhands")  # CLIP reads lowercase
    plain = picture(engine, "a red apple")
    assert np.abs(picture(engine, "a red apple, shiny") - plain).mean() > 0.5
    assert np.abs(picture(engine, "a red apple", negative="badhands") - plain).mean() > 0.5


def test_the_same_name_with_other_vectors_gives_another_picture(engine, models_dir, tmp_path):
    """The picture follows the file's vectors, not just the new token: the embedding is really read."""
    write_a1111_pt(tmp_path / "other", "badhands", vectors(2, 99))
    other = make_engine(models_dir, tmp_path, tmp_path / "other")
    assert np.abs(picture(other, "a red apple, badhands") - picture(engine, "a red apple, badhands")).mean() > 0.5


def test_a_name_matches_whole_words_and_leaves_the_models_own_tokens_alone(models_dir, tmp_path):
    """As A1111 matches by token ids: an embedding called "art" is the word art, not the "art" of cartoon, and
    no row of the model's own vocabulary changes (a word piece such as "art" is one)."""
    write_a1111_pt(tmp_path / "ti", "art", vectors(1, 8))
    with_art = make_engine(models_dir, tmp_path, tmp_path / "ti")
    without = make_engine(models_dir, tmp_path, tmp_path / "none")
    vocabulary = len(without.tokenizer)
    assert torch.equal(with_art.pipe.text_encoder.get_input_embeddings().weight[:vocabulary],
                       without.pipe.text_encoder.get_input_embeddings().weight)
    for prompt in ("a heart, cartoon artwork", "a cart"):
        assert np.array_equal(picture(with_art, prompt), picture(without, prompt)), prompt
    assert np.abs(picture(with_art, "a red apple, art") - picture(without, "a red apple, art")).mean() > 0.5
    assert with_art.ti_hashes(GenerationRequest(prompt="a heart, cartoon artwork", steps=3)) is None


def test_an_embedding_stays_whole_in_one_chunk(engine, models_dir, tmp_path):
    """A1111 starts the next 75-token chunk rather than split an embedding's vectors."""
    from webui.engine.prompts import _split

    save_file({"emb_params": vectors(8, 6)}, str(tmp_path / "eight.safetensors"))
    eight = make_engine(models_dir, tmp_path, tmp_path)
    chunks = _split(eight.tokenizer, "red " * 70 + "eight")
    assert [len(ids) for ids, _ in chunks] == [70, 8]
    assert chunks[1][0] == list(eight.embeddings.loaded["eight"].vector_ids)
    # At a full chunk A1111 first moves the words after a near comma on, then places the embedding.
    assert [len(ids) for ids, _ in _split(eight.tokenizer, "red " * 60 + ", " + "blue " * 14 + "eight")] == [61, 22]


def test_two_files_of_one_name_load_one(tmp_path, models_dir):
    write_a1111_pt(tmp_path / "ti", "badhands", vectors(2, 1))
    write_a1111_pt(tmp_path / "ti" / "old", "badhands", vectors(2, 9))
    found = make_engine(models_dir, tmp_path, tmp_path / "ti").embeddings
    assert list(found.loaded) == ["badhands"] and found.skipped == {}


def test_ti_hashes_name_the_embeddings_a_run_reads(engine):
    digest = hashlib.sha256(engine.embeddings.loaded["badhands"].path.read_bytes()).hexdigest()[:12]
    request = GenerationRequest(prompt="a red apple, shiny", negative_prompt="(badhands:1.2)", steps=3)
    shiny = hashlib.sha256(engine.embeddings.loaded["shiny"].path.read_bytes()).hexdigest()[:12]
    assert engine.ti_hashes(request) == f"badhands: {digest}, shiny: {shiny}"
    assert engine.ti_hashes(GenerationRequest(prompt="a red apple", steps=3)) is None


def test_a_refresh_adds_new_files_and_keeps_the_loaded_ones(engine, tmp_path):
    folder = engine.settings.embeddings_folder
    save_file({"emb_params": vectors(3, 7)}, str(folder / "fresh.safetensors"))
    try:
        found = engine.refresh_embeddings()
        assert "fresh" in found.loaded and "badhands" in found.loaded and "badhands" not in found.skipped
        assert engine.count_tokens("fresh") == 3
    finally:
        (folder / "fresh.safetensors").unlink()


def test_ti_hashes_follow_the_vectors_in_use_and_the_texts_the_run_reads(models_dir, tmp_path):
    """A file saved again keeps its old vectors until a refresh, and so its old hash; a name that prompt editing
    never reaches in the run's steps is not listed."""
    path = write_a1111_pt(tmp_path / "ti", "badhands", vectors(2, 1))
    first = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    engine = make_engine(models_dir, tmp_path, tmp_path / "ti")
    request = GenerationRequest(prompt="a cat, badhands", steps=3)
    before = picture(engine, "a cat, badhands")
    write_a1111_pt(tmp_path / "ti", "badhands", vectors(2, 50))
    assert engine.ti_hashes(request) == f"badhands: {first}"
    engine.refresh_embeddings()  # the new file is read into new rows
    assert engine.ti_hashes(request) == f"badhands: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert np.abs(picture(engine, "a cat, badhands") - before).mean() > 0.5
    assert engine.ti_hashes(GenerationRequest(prompt="a cat [dog:badhands:50]", steps=20)) is None


def test_under_lowvram_the_embeddings_are_read_before_the_offload(models_dir, tmp_path, monkeypatch, caplog):
    """Sequential offload keeps its own copy of the token table: the table must have grown before it is made,
    and a refresh afterwards leaves it alone with a message instead of breaking every generation."""
    import logging

    from accelerate import cpu_offload

    import webui.engine.generate as generate

    write_a1111_pt(tmp_path / "ti", "badhands", vectors(2, 1))
    plain = make_engine(models_dir, tmp_path, tmp_path / "ti")
    real_place = generate.place_pipeline

    def place_with_offload(pipe, settings, placement):  # as --lowvram places the text encoder on a GPU
        real_place(pipe, settings, placement)
        cpu_offload(pipe.text_encoder, execution_device=torch.device("cpu"))

    monkeypatch.setattr(generate, "place_pipeline", place_with_offload)
    # On a GPU the pipeline's hooks name the execution device; here only the text encoder has one.
    from diffusers import StableDiffusionPipeline
    monkeypatch.setattr(StableDiffusionPipeline, "_execution_device", property(lambda self: torch.device("cpu")))
    offloaded = make_engine(models_dir, tmp_path, tmp_path / "ti")
    assert np.array_equal(picture(offloaded, "a cat, badhands"), picture(plain, "a cat, badhands"))
    save_file({"emb_params": vectors(1, 2)}, str(tmp_path / "ti" / "shiny.safetensors"))
    with caplog.at_level(logging.WARNING):
        assert list(offloaded.refresh_embeddings().loaded) == ["badhands"]
    assert "not while --lowvram offloads it" in caplog.text
    assert np.array_equal(picture(offloaded, "a cat, badhands"), picture(plain, "a cat, badhands"))
