"""A1111's Interrogate CLIP: a prompt that describes a picture, to start an img2img prompt from.

A captioning model (BLIP) writes a sentence about the picture, and a CLIP model then picks, out of this project's
own lists of mediums, art movements and "flavours" (lighting, detail, framing), the words that fit the picture
best; the prompt is the caption followed by those words, as A1111 writes it ("a cat sitting on a sofa, oil
painting, impressionism, soft lighting, ...").

Both models are transformers models, read from a folder in transformers' layout (`models/BLIP`, and `models/CLIP`
or `--clip-models-path`) when one holds a config.json, else downloaded once from the model hub into its cache (not
with --offline). They are loaded on first use, run on the worker's thread, and kept in RAM between uses; their
device memory is handed back after each picture, as A1111 does by default.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from webui.engine.interrogate_words import TOPICS
from webui.schemas import InvalidRequest

INTERROGATE_MODEL = "clip"  # A1111's name for this interrogator (its other, "deepdanbooru", is not offered)
CAPTION_REPO = "Salesforce/blip-image-captioning-base"  # about 1 GB
CLIP_REPO = "openai/clip-vit-large-patch14"  # about 1.7 GB: the CLIP SD 1.x was trained with
HUB_FILES = ["*.json", "*.txt", "*.safetensors"]  # configs, tokenizers and weights; not the .bin/.h5/.msgpack copies
# The caption's length in tokens and its beam search: short sentences, each word chosen with a little look-ahead.
CAPTION_BEAMS, CAPTION_MIN_TOKENS, CAPTION_MAX_TOKENS = 3, 5, 40

log = logging.getLogger(__name__)


class InterrogateError(InvalidRequest):
    """The models cannot be had (not in their folder and not downloadable) or not read; the message says what to do."""


@dataclass
class _Loaded:
    """A model and its processor, and (CLIP) the topic words' embeddings."""
    model: Any
    processor: Any
    words: dict[str, torch.Tensor] | None = None


def _features(output) -> torch.Tensor:
    """get_*_features gives a tensor in transformers 4, an output whose pooler_output holds it in 5."""
    return output if torch.is_tensor(output) else output.pooler_output


def rank(picture_features: torch.Tensor, word_features: torch.Tensor, count: int) -> list[int]:
    """The indices of the `count` words whose embeddings point most nearly the way the picture's does (CLIP's
    cosine similarity), best first."""
    picture = picture_features / picture_features.norm(dim=-1, keepdim=True)
    words = word_features / word_features.norm(dim=-1, keepdim=True)
    similarity = (words.float() @ picture.float().reshape(-1, 1)).squeeze(1)
    return similarity.topk(min(count, len(similarity))).indices.tolist()


class Interrogator:
    """The captioning and CLIP models, loaded on first use (one build at a time) and kept in RAM."""

    def __init__(self, caption_folder: Path, clip_folder: Path, downloads: bool = True,
                 download: Callable[[str], Path] | None = None):
        self.caption_folder, self.clip_folder = Path(caption_folder), Path(clip_folder)
        self.downloads = downloads
        self._download = download  # None: the hub (looked up at each use, so tests can stop it)
        self._lock = threading.Lock()
        self._caption: _Loaded | None = None
        self._clip: _Loaded | None = None

    def describe(self, picture: Image.Image, device: str, dtype: torch.dtype) -> str:
        """The caption, then the best words of each topic, joined by commas."""
        picture = picture.convert("RGB")
        with self._lock:
            caption = self._load_caption()
            clip = self._load_clip()
            try:
                sentence = self._caption_of(caption, picture, device, dtype)
                words = self._words_for(clip, picture, device, dtype)
            finally:
                for loaded in (caption, clip):  # the device memory goes back to the SD model
                    loaded.model.to("cpu")
        return ", ".join([sentence, *words])

    def forget(self) -> None:
        """Drop both models (the API's unload-checkpoint, and a model folder changed on disk)."""
        with self._lock:
            self._caption = self._clip = None

    # --- running ---------------------------------------------------------------------------------------
    @staticmethod
    def _caption_of(caption: _Loaded, picture: Image.Image, device: str, dtype: torch.dtype) -> str:
        model = caption.model.to(device, dtype)
        inputs = caption.processor(images=picture, return_tensors="pt").to(device)
        with torch.inference_mode():
            tokens = model.generate(pixel_values=inputs["pixel_values"].to(dtype), num_beams=CAPTION_BEAMS,
                                    min_length=CAPTION_MIN_TOKENS, max_length=CAPTION_MAX_TOKENS)
        return caption.processor.decode(tokens[0], skip_special_tokens=True).strip()

    @staticmethod
    def _words_for(clip: _Loaded, picture: Image.Image, device: str, dtype: torch.dtype) -> list[str]:
        model = clip.model.to(device, dtype)
        pixels = clip.processor(images=picture, return_tensors="pt")["pixel_values"].to(device, dtype)
        with torch.inference_mode():
            picture_features = _features(model.get_image_features(pixel_values=pixels))[0]
            if clip.words is None:  # once per loaded model: about 200 short texts
                clip.words = {topic: _text_features(clip, words, device) for topic, _, words in TOPICS}
        chosen = []
        for topic, count, words in TOPICS:
            chosen += [words[index] for index in rank(picture_features, clip.words[topic].to(device), count)]
        return chosen

    # --- loading ---------------------------------------------------------------------------------------
    def _load_caption(self) -> _Loaded:
        if self._caption is None:
            from transformers import BlipForConditionalGeneration, BlipProcessor

            self._caption = self._load(self.caption_folder, CAPTION_REPO, BlipForConditionalGeneration, BlipProcessor,
                                       "the captioning model (BLIP)")
        return self._caption

    def _load_clip(self) -> _Loaded:
        if self._clip is None:
            from transformers import CLIPModel, CLIPProcessor

            self._clip = self._load(self.clip_folder, CLIP_REPO, CLIPModel, CLIPProcessor, "the CLIP model")
        return self._clip

    def _load(self, folder: Path, repo: str, model_class, processor_class, what: str) -> _Loaded:
        source = folder if (folder / "config.json").is_file() else self._fetch(folder, repo, what)
        log.info("loading %s for Interrogate from %s", what, source)
        try:
            model = model_class.from_pretrained(source, dtype=torch.float32).eval()
            processor = processor_class.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InterrogateError(f"Interrogate: {what} in {source} could not be read ({err}); put a transformers "
                                   f"copy of {repo} there (its config.json, tokenizer and weights)") from err
        return _Loaded(model, processor)

    def _fetch(self, folder: Path, repo: str, what: str) -> Path:
        if not self.downloads:
            raise InterrogateError(f"Interrogate needs {what}: put a transformers copy of {repo} in {folder} (its "
                                   "config.json, tokenizer and weights), or start without --offline to download it "
                                   "once")
        log.info("downloading %s (%s) for Interrogate, once", what, repo)
        try:
            return (self._download or _hub_snapshot)(repo)
        except Exception as err:  # no network, no disk space, a hub error: all say the same to the user
            raise InterrogateError(f"Interrogate could not download {what} ({repo}): {err}. Put a transformers copy "
                                   f"of it in {folder} instead") from err


def _text_features(clip: _Loaded, words: tuple[str, ...], device: str) -> torch.Tensor:
    tokens = clip.processor(text=list(words), return_tensors="pt", padding=True, truncation=True).to(device)
    return _features(clip.model.get_text_features(input_ids=tokens["input_ids"],
                                                  attention_mask=tokens["attention_mask"])).float().cpu()


def _hub_snapshot(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
