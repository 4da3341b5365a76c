"""Hub ids: which files are fetched, the cache path (no network), the download path against a local stand-in
for the hub, and the messages when the hub cannot be reached, is switched off, or has no such model."""
from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tests.tiny_sd import make_tiny_pipeline, save_tiny_model
from tests.tiny_sdxl import save_tiny_sdxl_model
from webui.config import Settings
from webui.engine import hub
from webui.engine.generate import Engine
from webui.engine.loader import ModelLoadError
from webui.engine.models import ModelRegistry
from webui.schemas import parse_request

REPO = "test-org/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# The file list of the SD 1.5 repository as published: 4 GB+ .ckpt copies at the top, fp16 and non-EMA
# variants, Flax weights next to the PyTorch ones.
SD15_FILES = """.gitattributes README.md model_index.json v1-inference.yaml v1-5-pruned.ckpt v1-5-pruned.safetensors
v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors feature_extractor/preprocessor_config.json
safety_checker/config.json safety_checker/model.safetensors safety_checker/model.fp16.safetensors
safety_checker/pytorch_model.bin safety_checker/pytorch_model.fp16.bin scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.safetensors text_encoder/model.fp16.safetensors
text_encoder/pytorch_model.bin text_encoder/pytorch_model.fp16.bin text_encoder/flax_model.msgpack
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
unet/config.json unet/diffusion_pytorch_model.safetensors unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.non_ema.safetensors unet/diffusion_pytorch_model.bin
unet/diffusion_pytorch_model.fp16.bin unet/diffusion_flax_model.msgpack vae/config.json
vae/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.fp16.safetensors
vae/diffusion_pytorch_model.bin""".split()
CONFIGS = ["feature_extractor/preprocessor_config.json", "model_index.json", "safety_checker/config.json",
           "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/merges.txt",
           "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
           "unet/config.json", "vae/config.json"]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, and a hub address where nothing listens: any network use fails fast."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _engine(tmp_path: Path, **settings) -> Engine:
    values = {"models_dir": tmp_path / "no-models", "outdir": tmp_path / "out", "device": "cpu"} | settings
    config = Settings(**values)
    return Engine(config, ModelRegistry(config.models_dir, hash_cache=config.outdir / "hashes.json"))


def _place_in_cache(cache: Path, repo_id: str, *, variant: str | None = None) -> Path:
    """The layout huggingface_hub writes: models--org--name/snapshots/<commit>/..., refs/main -> <commit>."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    if variant:
        make_tiny_pipeline().save_pretrained(snapshot, variant=variant)
    else:
        save_tiny_model(snapshot)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


def _one_image(engine: Engine):
    request = parse_request({"prompt": "red apple", "steps": 2, "seed": 7})
    return engine.generate(request, [7])[0].image


# --- which files -----------------------------------------------------------------------------------------
def test_one_set_of_weights_per_part_and_no_checkpoint_copies():
    on_gpu, variant = hub.select_files(SD15_FILES, half=True)
    assert variant == "fp16"
    assert on_gpu == sorted(CONFIGS + ["safety_checker/model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
                                       "unet/diffusion_pytorch_model.fp16.safetensors",
                                       "vae/diffusion_pytorch_model.fp16.safetensors"])
    on_cpu, variant = hub.select_files(SD15_FILES, half=False, safety_checker=False)
    assert variant is None
    assert on_cpu == sorted([c for c in CONFIGS if not c.startswith("safety_checker/")] + [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"])


def test_variant_only_when_every_part_has_it():
    files = ["model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"]
    assert hub.pick_variant(files, half=True) is None  # the VAE has no fp16 file: load plain weights
    chosen, _ = hub.select_files(files, half=True)
    assert "vae/diffusion_pytorch_model.bin" in chosen
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in chosen
    only_fp16 = ["model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors", "vae/model.fp16.bin"]
    assert hub.pick_variant(only_fp16, half=False) == "fp16"  # nothing else to load
    sharded = ["model_index.json", "text_encoder/model-00001-of-00002.safetensors",
               "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json"]
    assert hub.select_files(sharded, half=False)[0] == sorted(sharded)


# --- the cache, without the network ----------------------------------------------------------------------
def test_model_in_the_cache_loads_without_the_network(hf_cache, tmp_path, monkeypatch):
    _place_in_cache(hf_cache, REPO)
    monkeypatch.setattr(hub, "download", _no_download)
    engine = _engine(tmp_path)
    loaded = engine.load(REPO)
    assert (loaded.entry.kind, loaded.entry.name) == ("hub", REPO)
    assert _one_image(engine).size == (64, 64)


def test_fp16_files_in_the_cache_load_on_the_cpu(hf_cache, tmp_path, monkeypatch):
    snapshot = _place_in_cache(hf_cache, REPO, variant="fp16")
    assert (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert hub.cached_snapshot(REPO, half=False).variant == "fp16"
    monkeypatch.setattr(hub, "download", _no_download)
    engine = _engine(tmp_path, offline=True)
    engine.load(REPO)
    assert _one_image(engine).size == (64, 64)


def _no_download(*args, **kwargs):
    raise AssertionError("a cached model must load without the hub")


# --- no network, --offline ---------------------------------------------------------------------------------
def test_no_network_says_what_to_do(hf_cache, tmp_path):
    with pytest.raises(ModelLoadError) as err:
        _engine(tmp_path).load("some-org/not-cached")
    message = str(err.value)
    assert "could not reach the Hugging Face hub" in message and "'some-org/not-cached'" in message
    assert "models folder" in message and "hf download some-org/not-cached --include" in message


def test_the_download_command_said_fetches_what_the_app_loads_not_the_whole_repository():
    """Plain `hf download` fetched SD 1.5's tens of GB of .ckpt copies and variants. Found by a probe."""
    import shlex

    from huggingface_hub.utils import filter_repo_objects

    from webui.engine.hub import download_command

    words = shlex.split(download_command("org/sd15"))
    patterns = words[words.index("--include") + 1:]
    listing = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors", "unet/config.json",
               "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
               "unet/diffusion_pytorch_model.fp16.bin", "text_encoder/model.safetensors", "tokenizer/merges.txt",
               "tokenizer/vocab.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]
    fetched = set(filter_repo_objects(listing, allow_patterns=patterns))
    assert fetched == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                       "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
                       "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"}


def test_offline_never_asks_the_hub(hf_cache, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", _no_download)
    with pytest.raises(ModelLoadError) as err:
        _engine(tmp_path, offline=True).load("some-org/not-cached")
    assert "--offline is set" in str(err.value) and str(hf_cache) in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        _engine(tmp_path).load("some-org/not-cached")


# --- the download, from a local stand-in for the hub --------------------------------------------------------
class FakeHub:
    """Answers the few hub routes huggingface_hub uses to download a snapshot, from folders on disk."""

    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()):
        self.repos = repos
        self.gated = gated  # listed, but files only for those who accepted the licence
        self.fetched: list[str] = []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub_.answer(self)

            def do_GET(self):
                hub_.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def files(self, repo_id: str) -> list[str]:
        root = self.repos[repo_id]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        path = unquote(urlparse(request.path).path)
        for repo_id, root in self.repos.items():
            api = f"/api/models/{repo_id}"
            if path == api or path.startswith(api + "/revision/"):
                siblings = [{"rfilename": f} for f in self.files(repo_id)]
                return self.send(request, json.dumps({"id": repo_id, "sha": COMMIT, "siblings": siblings}).encode())
            if path.startswith(api + "/tree/"):
                tree = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                         "oid": hashlib.sha1(f.encode()).hexdigest()} for f in self.files(repo_id)]
                return self.send(request, json.dumps(tree).encode())
            resolve = f"/{repo_id}/resolve/"
            if path.startswith(resolve) and repo_id in self.gated:
                request.send_response(403)
                request.send_header("X-Error-Code", "GatedRepo")
                request.send_header("Content-Length", "0")
                request.end_headers()
                return
            if path.startswith(resolve):
                name = path[len(resolve):].partition("/")[2]
                data = (root / name).read_bytes()
                if request.command == "GET":
                    self.fetched.append(name)
                return self.send(request, data, {"X-Repo-Commit": COMMIT,
                                                 "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
        request.send_response(404)
        request.send_header("X-Error-Code", "RepoNotFound")
        request.send_header("Content-Length", "0")
        request.end_headers()

    @staticmethod
    def send(request, body: bytes, headers: dict | None = None) -> None:
        request.send_response(200)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command == "GET":
            request.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(tmp_path, hf_cache, monkeypatch):
    repo = save_tiny_model(tmp_path / "published")
    (repo / "tiny-pruned.ckpt").write_bytes(b"a 4 GB checkpoint copy")  # must never be fetched
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").write_bytes(b"weights")
    refiner = tmp_path / "sdxl-refiner"  # an SDXL refiner: the second text encoder alone
    (refiner / "text_encoder_2").mkdir(parents=True)
    (refiner / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    (refiner / "text_encoder_2" / "model.safetensors").write_bytes(b"gigabytes of weights")
    sd3 = tmp_path / "sd3"
    (sd3 / "transformer").mkdir(parents=True)
    (sd3 / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    (sd3 / "transformer" / "model.safetensors").write_bytes(b"gigabytes of weights")
    sdxl = save_tiny_sdxl_model(tmp_path / "sdxl")
    pix2pix = save_tiny_model(tmp_path / "pix2pix")
    unet_config = pix2pix / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "in_channels": 7}))  # no kind we run
    server = FakeHub({REPO: repo, "test-org/single-file": single, "test-org/gated": repo, "test-org/sd3": sd3,
                      "test-org/sdxl-refiner": refiner, "test-org/sdxl": sdxl, "test-org/pix2pix": pix2pix},
                     gated=("test-org/gated",))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


def test_a_hub_model_downloads_once_with_progress_then_loads_from_the_cache(fake_hub, hf_cache, tmp_path, caplog,
                                                                            monkeypatch):
    caplog.set_level(logging.INFO, logger="webui.engine.hub")
    engine = _engine(tmp_path)
    engine.load(REPO)
    assert _one_image(engine).size == (64, 64)
    assert "tiny-pruned.ckpt" not in fake_hub.fetched
    assert sorted(fake_hub.fetched) == sorted(f for f in fake_hub.files(REPO) if f != "tiny-pruned.ckpt")
    logged = caplog.text
    assert f"downloading {REPO}" in logged and "100% done" in logged
    snapshot = hf_cache / "models--test-org--tiny-sd" / "snapshots" / COMMIT
    assert (snapshot / "model_index.json").is_file()
    assert (hf_cache / "models--test-org--tiny-sd" / "refs" / "main").read_text().strip() == COMMIT

    # A second start finds it in the cache and never asks the hub.
    fake_hub.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    again = _engine(tmp_path, offline=True)
    assert again.load(REPO).entry.source == REPO


def test_download_reports_progress_to_a_callback(fake_hub):
    seen: list[float] = []
    snapshot = hub.download(REPO, half=False, progress=lambda label, fraction: seen.append(fraction))
    assert snapshot.downloaded and snapshot.variant is None
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


def test_unknown_moved_gated_and_single_file_repositories_say_what_to_do(fake_hub, tmp_path):
    engine = _engine(tmp_path)
    with pytest.raises(ModelLoadError, match="'nobody/nothing' was not found on the Hugging Face hub"):
        engine.load("nobody/nothing")
    with pytest.raises(ModelLoadError, match="It has moved: use 'stable-diffusion-v1-5/stable-diffusion-v1-5'"):
        engine.load("runwayml/stable-diffusion-v1-5")
    with pytest.raises(ModelLoadError, match=r"no model_index.json\).*model.safetensors.*models folder"):
        engine.load("test-org/single-file")
    with pytest.raises(ModelLoadError, match=r"'test-org/gated' is gated: accept its licence .* HF_TOKEN"):
        engine.load("test-org/gated")
    with pytest.raises(ModelLoadError, match=r"'test-org/sd3' is not an SD 1.x, 2.x or SDXL model \(SD3"):
        engine.load("test-org/sd3")
    assert fake_hub.fetched == []  # refused before anything was downloaded


def test_a_hub_model_whose_unet_takes_other_inputs_is_refused_before_its_weights_are_downloaded(fake_hub, tmp_path):
    with pytest.raises(ModelLoadError, match="takes 7 input channels"):
        _engine(tmp_path).load("test-org/pix2pix")
    assert "unet/config.json" in fake_hub.fetched  # the UNet's config says it
    assert not [name for name in fake_hub.fetched if name.endswith((".safetensors", ".bin"))]


def test_a_hub_sdxl_model_downloads_and_draws_and_a_refiner_is_refused_before_its_weights(fake_hub, tmp_path):
    engine = _engine(tmp_path)
    assert engine.load("test-org/sdxl").sdxl
    assert _one_image(engine).size == (64, 64)
    assert "text_encoder_2/config.json" in fake_hub.fetched and "tokenizer_2/tokenizer_config.json" in fake_hub.fetched
    fake_hub.fetched.clear()
    with pytest.raises(ModelLoadError, match="test-org/sdxl-refiner is an SDXL refiner .* pick an SDXL base model"):
        engine.load("test-org/sdxl-refiner")
    assert fake_hub.fetched == ["model_index.json"]  # its index says it, before any weights


def test_a_hub_that_takes_the_connection_but_never_answers_gives_up(hf_cache, monkeypatch):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts (the kernel does), never answers
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(hub, "HUB_TIMEOUT_SECONDS", 1.0, raising=False)
    done = threading.Event()
    outcome = []

    def try_download():
        try:
            hub.download(REPO, half=False)
        except hub.HubError as err:
            outcome.append(str(err))
        done.set()

    threading.Thread(target=try_download, daemon=True).start()
    try:
        assert done.wait(30), "the download waited for an answer that never comes"
        assert outcome and "could not reach the Hugging Face hub" in outcome[0]
    finally:
        listener.close()
