"""Tokenizer, data preparation and a training smoke test of the embedded-model pipeline (CPU, seconds)."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training import prepare_data, train  # noqa: E402

TOKENIZER_DIR = ROOT / "webui" / "engine" / "model_configs" / "clip-tokenizer"


@pytest.mark.parametrize("text, ids", [
    ("a photograph of an astronaut riding a horse", [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]),
    ("red apple", [49406, 736, 3055, 49407]),
])
def test_clip_tokenizer_reproduces_published_ids(text, ids):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert len(tok) == 49408
    assert tok(text).input_ids == ids


# --- a fake npm tarball: emoji.json + a few RGBA PNGs, laid out like emoji-datasource-* ----------------
COLOURS = {"1F34E": (220, 30, 30), "1F600": (250, 200, 40), "2603-FE0F": (90, 140, 250), "1F44D": (240, 190, 150)}


def _emoji_png(colour, seed: int) -> bytes:
    """A coloured disc on a transparent background (a stand-in for an emoji picture)."""
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32 + seed) ** 2 < 20 ** 2
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[disc] = (*colour, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def make_fake_package(raw: Path, style: str) -> None:
    entries = [
        {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "short_names": ["apple"], "category": "Food & Drink", "sort_order": 3},
        {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "short_names": ["grinning"], "category": "Smileys & Emotion", "sort_order": 1},
        {"name": "SNOWMAN", "unified": "2603-FE0F", "image": "2603-fe0f.png", "short_names": ["snowman"], "category": "Travel & Places", "sort_order": 2},
        {"name": "THUMBS UP SIGN", "unified": "1F44D", "image": "1f44d.png", "short_names": ["+1", "thumbsup"], "category": "People & Body", "sort_order": 4,
         "skin_variations": {"1F3FB": {"image": "1f44d-1f3fb.png", f"has_img_{style}": True}}},
        {"name": "FLAG FOR FRANCE", "unified": "1F1EB-1F1F7", "image": "1f1eb-1f1f7.png", "short_names": ["fr"], "category": "Flags", "sort_order": 5},
        {"name": "NO PICTURE", "unified": "1F9FF", "image": "1f9ff.png", "short_names": ["nope"], "category": "Objects", "sort_order": 6},
    ]
    for e in entries:
        e[f"has_img_{style}"] = e["unified"] != "1F9FF"
    files = {"package/emoji.json": json.dumps(entries).encode()}
    for i, (uni, colour) in enumerate(COLOURS.items()):
        files[f"package/img/{style}/64/{uni.lower()}.png"] = _emoji_png(colour, i)
    files[f"package/img/{style}/64/1f44d-1f3fb.png"] = _emoji_png((250, 220, 200), 0)
    files[f"package/img/{style}/64/1f1eb-1f1f7.png"] = _emoji_png((0, 0, 200), 0)
    raw.mkdir(parents=True, exist_ok=True)
    with tarfile.open(prepare_data.tarball_path(raw, style), "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("emoji")
    for style in ("google", "twitter"):
        make_fake_package(base / "raw", style)
    prepare_data.prepare(base / "raw", base / "data", ["google", "twitter"])
    return base


def test_prepare_data_writes_images_on_white_with_captions(tiny_data):
    records = [json.loads(line) for line in open(tiny_data / "data" / "metadata.jsonl")]
    # 4 emoji x 2 styles; the flag and the emoji without a picture are left out, no skin tones by default
    assert len(records) == 8
    assert {r["emoji"] for r in records} == set(COLOURS)
    assert {r["style"] for r in records} == {"google", "twitter"}
    apple = next(r for r in records if r["emoji"] == "1F34E")
    assert apple["captions"] == ["red apple", "apple", "red apple emoji"]
    thumbs = next(r for r in records if r["emoji"] == "1F44D")
    assert "thumbsup" in thumbs["captions"] and "+1" in thumbs["captions"]
    img = np.asarray(Image.open(tiny_data / "data" / apple["file"]))
    assert img.shape == (64, 64, 3)
    assert (img[0, 0] == 255).all(), "transparent corner must become white"
    assert tuple(img[32, 32]) == COLOURS["1F34E"]


def test_prepare_data_is_deterministic_and_can_add_skin_tones(tiny_data, tmp_path):
    again = prepare_data.prepare(tiny_data / "raw", tmp_path / "again", ["google", "twitter"])
    assert (tmp_path / "again" / "metadata.jsonl").read_bytes() == (tiny_data / "data" / "metadata.jsonl").read_bytes()
    first = again[0]["file"]
    assert (tmp_path / "again" / first).read_bytes() == (tiny_data / "data" / first).read_bytes()
    toned = prepare_data.prepare(tiny_data / "raw", tmp_path / "toned", ["google"], skin_tones=True)
    light = [r for r in toned if r["file"].endswith("1f44d-1f3fb.png")]
    assert light and light[0]["emoji"] == "1F44D" and light[0]["captions"][0] == "thumbs up sign, light skin tone"


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run / "unet_log.jsonl")]


@pytest.fixture(scope="module")
def tiny_run(tiny_data) -> Path:
    torch.set_num_threads(1)
    run = tiny_data / "run"
    common = ["--data", str(tiny_data / "data"), "--run", str(run), "--config", "tiny", "--no-progress"]
    train.main(["vae", *common, "--max-steps", "30", "--batch", "8"])
    train.main(["unet", *common, "--max-steps", "40", "--batch", "16", "--log-every", "1", "--lr", "2e-3",
                "--warmup", "5", "--sample-minutes", "0"])
    return run


def test_training_smoke_loss_goes_down(tiny_run):
    assert (tiny_run / "vae" / "config.json").exists()
    assert json.loads((tiny_run / "vae_info.json").read_text())["scaling_factor"] > 0
    losses = _losses(tiny_run)
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses


def test_training_resumes_from_checkpoint(tiny_run, tiny_data):
    ck = torch.load(tiny_run / "unet_ckpt.pt", weights_only=False)
    assert ck["step"] == 40 and ck["seen"] == 40 * 16
    train.main(["unet", "--data", str(tiny_data / "data"), "--run", str(tiny_run), "--config", "tiny",
                "--no-progress", "--max-steps", "43", "--batch", "16", "--log-every", "1", "--sample-minutes", "0"])
    ck = torch.load(tiny_run / "unet_ckpt.pt", weights_only=False)
    assert ck["step"] == 43  # continued from 40, did not start over
    assert len(_losses(tiny_run)) == 43


def test_learning_rate_warms_up_holds_then_decays_from_an_absolute_step():
    from argparse import Namespace

    args = Namespace(lr=1e-3, warmup=10, decay_start=None, decay_steps=100, lr_end=1e-4)
    assert train.learning_rate(args, 0) == pytest.approx(1e-4)
    assert train.learning_rate(args, 5000) == pytest.approx(1e-3)  # no decay asked: constant
    args.decay_start = 1000
    assert train.learning_rate(args, 999) == pytest.approx(1e-3)
    assert train.learning_rate(args, 1050) == pytest.approx(5.5e-4)  # halfway
    assert train.learning_rate(args, 1100) == pytest.approx(1e-4)
    assert train.learning_rate(args, 9000) == pytest.approx(1e-4)  # stays at the end value


def test_export_is_a_loadable_stable_diffusion_folder(tiny_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "model"
    train.main(["export", "--run", str(tiny_run), "--out", str(out)])
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert sched["rescale_betas_zero_snr"] is True and sched["timestep_spacing"] == "trailing"
    assert sched["clip_sample"] is False  # carried to a DDIMScheduler made from this config
    assert (out / "tokenizer" / "vocab.json").read_bytes() == (TOKENIZER_DIR / "vocab.json").read_bytes()
    assert not (out / "tokenizer" / "tokenizer.json").exists()  # 3.6 MB the size budget cannot afford
    assert list(out.glob("unet/*.safetensors")) and not list(out.rglob("*.bin"))
    from safetensors import safe_open

    for f in out.rglob("*.safetensors"):  # every weight is stored in fp16 (half the size)
        with safe_open(str(f), "pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float16}, f
    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32)
    img = pipe("red apple", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()


def test_a_camera_photo_in_the_dataset_is_read_and_resized_and_a_larger_one_named(tmp_path, monkeypatch):
    """A1111 resizes any dataset picture; one over the request limit of 16.8 megapixels (a 24-megapixel photo)
    failed the whole run (found by a probe). Past the training limit the picture is named with its size."""
    import webui.engine.training as training

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(photo, quality=80)
    pixels = training._pixels(photo, 64, 48)
    assert tuple(pixels.shape) == (1, 3, 48, 64)
    assert torch.allclose(pixels[0, :, 24, 32], torch.tensor([200, 30, 30]) / 127.5 - 1.0, atol=0.05)
    monkeypatch.setattr(training, "TRAINING_MAX_PIXELS", 1000 * 1000)
    with pytest.raises(training.TrainingError, match=r"photo.jpg cannot be read as a picture \(it is 6000x4000; "
                                                     "scale it down to at most 1 megapixels"):
        training._pixels(photo, 64, 48)
