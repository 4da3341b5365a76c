"""Interrogate CLIP (A1111's): a caption by a BLIP model, then the words a CLIP model ranks best, out of the
project's lists. Tiny random BLIP and CLIP models are built here and saved in transformers' layout."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY
from tests.helpers import noise_picture
from webui.engine.interrogate import CAPTION_REPO, InterrogateError, Interrogator, rank
from webui.engine.interrogate_words import FLAVORS, MEDIUMS, MOVEMENTS, TOPICS

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "the", "mat", "red", "blue",
              "picture", "of", "sofa", "with", "and"]


def save_tiny_blip(folder) -> None:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS))
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), BertTokenizer(str(folder / "vocab.txt")))
    config = BlipConfig(
        text_config=dict(vocab_size=len(BERT_WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=2,
                         sep_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)


def save_tiny_clip(folder, seed: int = 1) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "models" / "sd-emoji-tiny" / "tokenizer")
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer).save_pretrained(folder)


@pytest.fixture(scope="module")
def interrogate_models(tmp_path_factory):
    """A folder with BLIP/ and CLIP/ holding tiny random models."""
    folder = tmp_path_factory.mktemp("interrogate")
    save_tiny_blip(folder / "BLIP")
    save_tiny_clip(folder / "CLIP")
    return folder


def best_words_by_hand(clip_folder, picture: Image.Image, words: tuple[str, ...], count: int) -> list[str]:
    """The `count` words nearest the picture by cosine similarity, worked out here with transformers alone."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)

    def features(output):
        return output if torch.is_tensor(output) else output.pooler_output

    with torch.no_grad():
        image = features(model.get_image_features(**processor(images=picture, return_tensors="pt")))[0]
        text = features(model.get_text_features(**processor(text=list(words), return_tensors="pt", padding=True)))
    scores = torch.nn.functional.cosine_similarity(text, image[None], dim=1)
    return [words[i] for i in scores.argsort(descending=True)[:count].tolist()]


def test_rank_orders_words_by_how_nearly_they_point_the_pictures_way():
    picture = torch.tensor([1.0, 0.0, 0.0])
    words = torch.tensor([[0.0, 1.0, 0.0], [10.0, 1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    assert rank(picture, words, 2) == [1, 2]  # direction counts, not length: 10,1 is nearer than 1,1
    assert rank(picture, words, 10) == [1, 2, 0, 3]


def test_the_word_lists_have_no_repeats_and_each_topic_takes_fewer_than_it_has():
    for topic, count, words in TOPICS:
        assert len(set(words)) == len(words), topic
        assert 0 < count < len(words)
    assert {words for _, _, words in TOPICS} == {MEDIUMS, MOVEMENTS, FLAVORS}


def test_a_picture_gets_its_caption_then_the_best_word_of_each_topic(interrogate_models):
    interrogator = Interrogator(interrogate_models / "BLIP", interrogate_models / "CLIP", downloads=False)
    picture = noise_picture(3, 48, 40)
    prompt = interrogator.describe(picture, "cpu", torch.float32)
    parts = prompt.split(", ")
    assert len(parts) == 1 + sum(count for _, count, _ in TOPICS), prompt
    caption, medium, movement, *flavors = parts
    assert caption and all(word in BERT_WORDS for word in caption.split())
    clip = interrogate_models / "CLIP"
    assert [medium] == best_words_by_hand(clip, picture, MEDIUMS, 1)
    assert [movement] == best_words_by_hand(clip, picture, MOVEMENTS, 1)
    assert flavors == best_words_by_hand(clip, picture, FLAVORS, 3)
    assert interrogator.describe(picture, "cpu", torch.float32) == prompt  # the same picture, the same words


def test_a_transparent_picture_is_read_on_white_as_the_page_shows_it(interrogate_models):
    interrogator = Interrogator(interrogate_models / "BLIP", interrogate_models / "CLIP", downloads=False)
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    from webui.engine.img2img import as_rgb

    assert interrogator.describe(as_rgb(clear), "cpu", torch.float32) == \
        interrogator.describe(Image.new("RGB", (40, 40), "white"), "cpu", torch.float32)


def test_without_the_models_offline_the_message_says_where_to_put_them(tmp_path):
    interrogator = Interrogator(tmp_path / "BLIP", tmp_path / "CLIP", downloads=False)
    with pytest.raises(InterrogateError, match=rf"put a transformers copy of {CAPTION_REPO} in .*BLIP.*without "
                                               r"--offline"):
        interrogator.describe(noise_picture(1, 16, 16), "cpu", torch.float32)


def test_models_missing_from_their_folders_are_downloaded_once(tmp_path, interrogate_models):
    fetched = []

    def download(repo):
        fetched.append(repo)
        return interrogate_models / ("BLIP" if repo == CAPTION_REPO else "CLIP")

    interrogator = Interrogator(tmp_path / "BLIP", tmp_path / "CLIP", download=download)
    first = interrogator.describe(noise_picture(2, 16, 16), "cpu", torch.float32)
    interrogator.describe(noise_picture(2, 16, 16), "cpu", torch.float32)
    assert fetched == [CAPTION_REPO, "openai/clip-vit-large-patch14"]
    assert first.count(", ") == 5


def test_a_failed_download_or_an_unreadable_folder_is_a_clear_error(tmp_path, interrogate_models):
    def broken(repo):
        raise OSError("network is unreachable")

    with pytest.raises(InterrogateError, match=r"could not download the captioning model \(BLIP\) .*unreachable.*"
                                               r"Put a transformers copy"):
        Interrogator(tmp_path / "BLIP", tmp_path / "CLIP", download=broken).describe(noise_picture(1, 8, 8), "cpu",
                                                                                     torch.float32)
    (tmp_path / "CLIP").mkdir()
    (tmp_path / "CLIP" / "config.json").write_text("{not json")
    interrogator = Interrogator(interrogate_models / "BLIP", tmp_path / "CLIP", downloads=False)
    with pytest.raises(InterrogateError, match=r"the CLIP model in .*CLIP could not be read"):
        interrogator.describe(noise_picture(1, 8, 8), "cpu", torch.float32)


@pytest.fixture
def interrogating_services(models_dir, interrogate_models, tmp_path):
    """Services whose Interrogate folders hold the tiny models; the shared models folder stays as it is."""
    from webui.config import Settings
    from webui.services import build_services

    settings = Settings(models_dir=models_dir, outdir=tmp_path / "outputs", ckpt=TINY, device="cpu", offline=True,
                        blip_dir=interrogate_models / "BLIP", clip_dir=interrogate_models / "CLIP")
    built = build_services(settings)
    yield built
    built.close()


def _base64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_api_interrogates_a_picture_and_refuses_what_it_cannot(interrogating_services, interrogate_models):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    picture = noise_picture(5, 24, 24)
    expected = Interrogator(interrogate_models / "BLIP", interrogate_models / "CLIP").describe(picture, "cpu",
                                                                                              torch.float32)
    with TestClient(create_api_app(interrogating_services)) as client:
        r = client.post("/sdapi/v1/interrogate", json={"image": _base64(picture), "model": "clip"})
        assert r.status_code == 200, r.text[:300]
        assert r.json() == {"caption": expected}
        r = client.post("/sdapi/v1/interrogate", json={"image": _base64(picture), "model": "deepdanbooru"})
        assert r.status_code == 422 and "model: 'deepdanbooru' is not an interrogator" in r.json()["detail"]
        r = client.post("/sdapi/v1/interrogate", json={"image": "not base64!"})
        assert r.status_code == 422 and "image" in r.json()["detail"]
        # the worker goes on after refusals
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "width": 64,
                                                      "height": 64}).status_code == 200


def test_the_api_says_where_to_put_the_models_when_it_has_none(services):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    services.settings.offline = True
    services.engine.interrogator.downloads = False
    with TestClient(create_api_app(services)) as client:
        r = client.post("/sdapi/v1/interrogate", json={"image": _base64(noise_picture(1, 16, 16))})
    assert r.status_code == 422
    assert "Interrogate needs the captioning model (BLIP)" in r.json()["detail"]


def test_the_img2img_button_fills_the_prompt_from_the_open_sub_tabs_picture(interrogating_services,
                                                                             interrogate_models):
    import asyncio
    import inspect

    import gradio as gr

    from webui.ui.generation import GenerationActions
    from webui.ui.pictures import SUBTAB_INPUTS

    actions = GenerationActions(interrogating_services, models=None, kind="img2img")
    picture = noise_picture(6, 32, 32)
    expected = Interrogator(interrogate_models / "BLIP", interrogate_models / "CLIP").describe(picture, "cpu",
                                                                                              torch.float32)
    inputs = {name: None for name in SUBTAB_INPUTS["img2img"]} | {"init_image": picture}
    # awaited on the event loop, not waited for on a thread of the pool every tab's events share
    assert inspect.iscoroutinefunction(actions.interrogate)
    assert asyncio.run(actions.interrogate("img2img", *inputs.values())) == expected
    with pytest.raises(gr.Error, match="Upload a picture first"):
        asyncio.run(actions.interrogate("img2img", *({name: None for name in SUBTAB_INPUTS["img2img"]}.values())))


def test_interrogate_folders_are_not_listed_as_checkpoints(tmp_path, interrogate_models):
    import shutil

    from webui.engine.models import scan_models_dir

    shutil.copytree(interrogate_models / "BLIP", tmp_path / "BLIP")
    shutil.copytree(interrogate_models / "CLIP", tmp_path / "CLIP")
    (tmp_path / "other").mkdir()
    shutil.copy(interrogate_models / "CLIP" / "model.safetensors", tmp_path / "other" / "model.safetensors")
    assert [entry.name for entry in scan_models_dir(tmp_path)] == ["other/model"]  # the test can tell


def test_the_clip_folder_flag_and_the_blip_folder_beside_it():
    from webui.config import parse_settings

    settings = parse_settings(["--clip-models-path", "/data/clip"], environ={})
    assert str(settings.clip_folder) == "/data/clip"
    assert settings.blip_folder == settings.models_dir / "BLIP"
