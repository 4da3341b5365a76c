"""Shared fixtures: a tiny random model on disk, Settings pointing at temp folders, live services."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest

# Tiny models gain nothing from several threads, and OpenMP threads that spin while another
# process holds a core slow the suite down tenfold; servers the tests start inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tiny_sd import save_tiny_model  # noqa: E402
from webui.config import Settings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("diffusers").setLevel(logging.ERROR)
TINY = "tiny-sd"


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Tests never reach the network: the upscalers' downloads may read file: URLs only, and Interrogate's models
    are never fetched from the hub."""
    import webui.engine.downloads as downloads
    import webui.engine.interrogate as interrogate

    def no_hub(repo: str):
        raise OSError(f"tests do not download ({repo})")

    def local_only(url: str, *args, **kwargs):
        if not url.startswith("file:"):
            raise OSError(f"tests do not download ({url})")
        return downloads.urllib.request.urlopen(url, *args, **kwargs)

    monkeypatch.setattr(downloads, "open_url", local_only)
    monkeypatch.setattr(interrogate, "_hub_snapshot", no_hub)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    save_tiny_model(folder / TINY)
    return folder


@pytest.fixture
def settings(models_dir, tmp_path) -> Settings:
    return Settings(models_dir=models_dir, outdir=tmp_path / "outputs", ckpt=TINY, device="cpu", preview_every=2)


@pytest.fixture
def services(settings):
    from webui.services import build_services

    built = build_services(settings)
    yield built
    built.close()


@pytest.fixture(scope="module")
def engine(models_dir, tmp_path_factory):
    """An Engine with the tiny model loaded, shared by a module's tests (modules with other needs define their own)."""
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry

    loaded = Engine(Settings(models_dir=models_dir, device="cpu"),
                    ModelRegistry(models_dir, tmp_path_factory.mktemp("cache") / "hashes.json"))
    loaded.load(TINY)
    return loaded


@pytest.fixture
def fresh_dynamo():
    """No compiled code from earlier tests in, none left behind for later ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add OpenMP stalls on a busy shared CPU
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)
