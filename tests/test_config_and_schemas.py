"""Flags, request validation messages, and the model registry (discovery, hashes)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from webui.config import DEFAULT_MODEL_NAME, parse_settings
from webui.engine.models import ModelNotFound, ModelRegistry
from webui.schemas import GenerationRequest, InvalidRequest, parse_request

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--listen", "--port", "--share", "--api", "--nowebui", "--gradio-auth", "--api-auth", "--ckpt-dir",
         "--models-dir", "--outdir", "--ckpt", "--device", "--no-half", "--no-half-vae", "--medvram", "--lowvram",
         "--xformers", "--no-safety-checker", "--offline", "--compile", "--queue-size", "--preview-every"]


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in FLAGS:
        assert flag in out.stdout, flag


def test_defaults_and_a1111_flag_names():
    s = parse_settings([])
    assert (s.host, s.port, s.ckpt, s.device, s.api_enabled) == ("127.0.0.1", 7860, DEFAULT_MODEL_NAME, "auto", False)
    s = parse_settings(["--listen", "--port", "9000", "--nowebui", "--gradio-auth", "a:b,c:d", "--api-auth", "u:p",
                        "--models-dir", "/m", "--device", "cpu", "--medvram", "--no-half-vae"])
    assert (s.host, s.port, s.api_enabled, str(s.models_dir)) == ("0.0.0.0", 9000, True, "/m")
    assert s.gradio_auth == [("a", "b"), ("c", "d")] and s.api_auth == [("u", "p")]
    assert s.medvram and s.no_half_vae and s.device == "cpu"
    assert str(parse_settings(["--ckpt-dir", "/x"]).models_dir) == "/x"


def test_server_folders_are_read_only_where_the_page_is_not_open_to_anyone():
    assert parse_settings([], environ={}).reads_server_folders
    assert parse_settings(["--listen", "--gradio-auth", "a:b"], environ={}).reads_server_folders  # logged in
    assert not parse_settings(["--listen"], environ={}).reads_server_folders
    assert not parse_settings(["--share"], environ={}).reads_server_folders
    assert not parse_settings(["--hide-ui-dir-config"], environ={}).reads_server_folders  # A1111's flag
    assert str(parse_settings(["--vae-dir", "/v"], environ={}).vae_folder) == "/v"


def test_bad_flags_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--gradio-auth", "admin:ok,admin=hunter2"], environ={})
    err = capsys.readouterr().err
    assert "user:password" in err and "entry 2" in err and "hunter2" not in err
    with pytest.raises(SystemExit):
        parse_settings(["--device", "tpu"])


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port must be between 1 and 65535, not 70000"),
    (["--port", "0"], "--port must be between 1 and 65535, not 0"),
    (["--preview-every", "-1"], "--preview-every must be 0 (no previews) to 32"),
    (["--preview-every", "33"], "--preview-every must be 0 (no previews) to 32"),
    (["--outdir", "{file}"], "it is a file, not a folder; pass a folder you can write to"),
    (["--outdir", "{file}/sub"], "is a file, not a folder; pass a folder you can write to"),
])
def test_flags_that_cannot_work_are_refused_before_anything_loads(flags, message, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    flags = [flag.format(file=tmp_path / "a-file") for flag in flags]
    with pytest.raises(SystemExit):
        parse_settings(flags, environ={})
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("fields, message", [
    ({"width": 500}, "width: must be a multiple of 8, got 500; use 496 or 504"),
    ({"height": 32}, "height: Input should be greater than or equal to 64"),
    ({"steps": -3}, "steps: Input should be greater than or equal to 1"),
    ({"steps": 1000}, "steps: Input should be less than or equal to 150"),
    ({"sampler_name": "Eular"}, "unknown sampler 'Eular'; choose one of: Euler a, Euler"),
    ({"prompt": "x" * 10_000}, "prompt: String should have at most 2000 characters; it has 10000"),
    ({"sampler_name": "DDIM", "scheduler": "Karras"}, "sampler 'DDIM' does not support the Karras"),
    ({"batch_size": 64}, "batch_size: Input should be less than or equal to 8"),
    ({"seed": -5}, "seed: Input should be greater than or equal to -1"),
    ({"seed": 1e30}, "seed: Unable to parse input string as an integer, exceeded maximum size; use -1 for a random "
                     "seed, or a whole number from 0 to 18446744073709551615"),
    ({"seed": 2**64}, "seed: Input should be less than or equal to 18446744073709551615"),
    ({"cfg_scale": "lots"}, "cfg_scale: Input should be a valid number"),
    ({"cfg_scale": float("nan")}, "cfg_scale: Input should be a finite number"),  # JSON's NaN
    ({"prompt": "a\x00b"}, "prompt: holds the control character U+0000 at position 1; remove it"),
    ({"negative_prompt": "ok\n\x1b[31m"}, "negative_prompt: holds the control character U+001B at position 3"),
])
def test_invalid_fields_say_what_to_fix(fields, message):
    with pytest.raises(InvalidRequest) as err:
        parse_request({"prompt": "ok"} | fields)
    assert message in str(err.value)


def test_old_combined_sampler_names_are_split():
    request = GenerationRequest(sampler_name="DPM++ 2M Karras")
    assert (request.sampler_name, request.scheduler) == ("DPM++ 2M", "Karras")


def test_registry_finds_folders_files_and_hub_ids(tmp_path):
    (tmp_path / "folder-model").mkdir()
    (tmp_path / "folder-model" / "model_index.json").write_text("{}")
    (tmp_path / "single.safetensors").write_bytes(b"weights")
    (tmp_path / "old.ckpt").write_bytes(b"ckpt")
    (tmp_path / "notes.txt").write_text("not a model")
    registry = ModelRegistry(tmp_path, tmp_path / "cache" / "hashes.json")
    assert [(e.name, e.kind) for e in registry.entries()] == [
        ("folder-model", "diffusers"), ("old", "single_file"), ("single", "single_file")]
    assert registry.find("single.safetensors").name == "single"
    assert registry.find("single [0123456789]").name == "single"
    assert registry.find("runwayml/stable-diffusion-v1-5").kind == "hub"
    with pytest.raises(ModelNotFound, match="available: folder-model, old, single"):
        registry.find("nothing")
    # A missing checkpoint file is named as such, never taken for a hub id to download.
    with pytest.raises(ModelNotFound, match="'models/mine.safetensors' does not exist.*folder-model, old, single"):
        registry.find("models/mine.safetensors")


def test_models_in_subfolders_are_found_by_their_relative_names(tmp_path):
    (tmp_path / "SD15").mkdir()
    (tmp_path / "SD15" / "mine.safetensors").write_bytes(b"weights")
    nested = tmp_path / "SD15" / "folder-model"
    (nested / "unet").mkdir(parents=True)
    (nested / "model_index.json").write_text("{}")
    (nested / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"part of the folder model, not a model")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "too-deep.safetensors").write_bytes(b"weights")
    registry = ModelRegistry(tmp_path, tmp_path / "cache" / "hashes.json")
    assert [(e.name, e.kind) for e in registry.entries()] == [("SD15/folder-model", "diffusers"),
                                                              ("SD15/mine", "single_file")]
    mine = registry.entries()[1]
    # A1111 clients name it by title (relative file name and hash); people by file name
    for spelling in ("SD15/mine", "SD15/mine.safetensors [0123456789]", "mine.safetensors", str(tmp_path / "SD15/mine.safetensors")):
        assert registry.find(spelling) == mine, spelling
    # ...and A1111's infotext by the base name alone ("Model: mine"), while it is the only one so named.
    assert registry.find("mine") == mine
    (tmp_path / "mine.safetensors").write_bytes(b"other weights")
    registry.refresh()
    assert registry.find("mine").name == "mine"  # the exact name wins
    (tmp_path / "SD21").mkdir()
    (tmp_path / "SD21" / "both.safetensors").write_bytes(b"one")
    (tmp_path / "SD15" / "both.safetensors").write_bytes(b"two")
    registry.refresh()
    with pytest.raises(ModelNotFound):
        registry.find("both")  # two models so named: neither is guessed
    assert registry.find_by_hash(registry.short_hash(registry.find("SD21/both"))) == registry.find("SD21/both")
    # A1111's checkpoint aliases: the short hash and the sha256, once hashed, name it too (sd_model_checkpoint)
    both = registry.find("SD21/both")
    assert registry.find(registry.short_hash(both)) == both and registry.find(registry.sha256(both).upper()) == both
    with pytest.raises(ModelNotFound):
        registry.find("0123456789")  # no model has that hash
    # Infotexts from before A1111 1.0 carry an 8-digit hash of the 64 KiB at 1 MiB into the file.
    old = tmp_path / "old.ckpt"
    old.write_bytes(os.urandom(0x100000) + b"the weights A1111 hashed" + os.urandom(0x10000))
    registry.refresh()
    expected = hashlib.sha256(old.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert registry.find_by_hash(expected.upper()) == registry.find("old")
    assert registry.find_by_hash("0badc0de") is None


def test_symlinked_models_keep_their_link_names_and_an_unreadable_folder_is_skipped(tmp_path, monkeypatch):
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    (elsewhere / "blobs").mkdir(parents=True)
    (elsewhere / "blobs" / "0a1b2c").write_bytes(b"weights")  # the Hugging Face cache: no extension
    (elsewhere / "webui").mkdir()
    (elsewhere / "webui" / "b.safetensors").write_bytes(b"weights")
    models.mkdir()
    (models / "cached.safetensors").symlink_to(elsewhere / "blobs" / "0a1b2c")
    (models / "A1111").symlink_to(elsewhere / "webui", target_is_directory=True)  # an old webui's folder
    (models / "locked").mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    registry = ModelRegistry(models, tmp_path / "hashes.json")
    assert [e.name for e in registry.entries()] == ["A1111/b", "cached"]
    assert registry.find("cached").source.endswith("cached.safetensors")  # the link, which says what it is
    assert registry.find("A1111/b").kind == "single_file"  # not taken for a hub id


def test_a_folders_hash_covers_only_the_weights_it_loads(tmp_path):
    """A cloned model repository also holds single-file checkpoints and fp16 variants: not hashed."""
    from webui.engine.models import weight_files

    folder = tmp_path / "cloned"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text("{}")
    for name in ("v1-5-pruned.ckpt", "unet/diffusion_pytorch_model.fp16.safetensors",
                 "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
                 "text_encoder/pytorch_model.bin"):
        (folder / name).write_bytes(name.encode())
    assert [p.relative_to(folder).as_posix() for p in weight_files(folder)] == [
        "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors"]


def test_two_spellings_of_one_model_are_one_entry(tmp_path, monkeypatch):
    (tmp_path / "folder-model").mkdir()
    (tmp_path / "folder-model" / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path.parent)
    registry = ModelRegistry(Path(tmp_path.name), tmp_path / "hashes.json")  # a relative models folder
    assert registry.find(str(tmp_path / "folder-model")) == registry.find("folder-model")  # else a reload


def test_find_listed_rescans_only_for_a_model_it_does_not_know(tmp_path, monkeypatch):
    import webui.engine.models as models

    (tmp_path / "known.safetensors").write_bytes(b"weights")
    registry = ModelRegistry(tmp_path, tmp_path / "cache" / "hashes.json")
    scans = []
    real_scan = models.scan_models_dir
    monkeypatch.setattr(models, "scan_models_dir",
                        lambda folder, *skipped: scans.append(folder) or real_scan(folder, *skipped))
    assert registry.find_listed("known").name == "known" and scans == []  # listed: no folder scan
    (tmp_path / "added.safetensors").write_bytes(b"weights")
    assert registry.find_listed("added").name == "added" and len(scans) == 1  # new file: one rescan
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    outside.write_bytes(b"weights")
    with pytest.raises(ModelNotFound, match="not found in the models folder"):  # a server path, not listed
        registry.find_listed(str(outside))


def test_short_hash_is_sha256_prefix_and_cached(tmp_path, monkeypatch):
    (tmp_path / "single.safetensors").write_bytes(b"weights")
    registry = ModelRegistry(tmp_path, tmp_path / "cache" / "hashes.json")
    entry = registry.find("single")
    expected = hashlib.sha256(b"weights").hexdigest()[:10]
    assert registry.short_hash(entry) == expected
    assert registry.title(entry) == f"single.safetensors [{expected}]"  # A1111 titles a file with its extension
    import webui.engine.models as models

    monkeypatch.setattr(models, "sha256_file", lambda path: pytest.fail("hash computed twice"))
    assert ModelRegistry(tmp_path, tmp_path / "cache" / "hashes.json").short_hash(entry) == expected


def test_a_hash_cache_that_cannot_be_written_still_gives_the_hash(tmp_path, monkeypatch, caplog):
    """A full disk: the digest computed is used (every image keeps its Model hash), and no temp file stays."""
    import errno
    import json

    (tmp_path / "single.safetensors").write_bytes(b"weights")
    cache = tmp_path / "cache" / "hashes.json"
    registry = ModelRegistry(tmp_path, cache)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)  # the temp file is made, then writing it fails
    assert registry.short_hash(registry.find("single")) == hashlib.sha256(b"weights").hexdigest()[:10]
    assert "cannot be written" in caplog.text and "No space left" in caplog.text
    assert list(cache.parent.iterdir()) == []


@pytest.mark.parametrize("text", ["null", "[]", '"text"', "{", ""])
def test_a_hash_cache_holding_no_json_object_counts_as_empty(tmp_path, text):
    (tmp_path / "single.safetensors").write_bytes(b"weights")
    cache = tmp_path / "hashes.json"
    cache.write_text(text)
    registry = ModelRegistry(tmp_path, cache)
    entry = registry.find("single")
    assert registry.title(entry) == "single.safetensors"  # nothing cached, and no error
    assert registry.short_hash(entry) == hashlib.sha256(b"weights").hexdigest()[:10]
    assert registry.title(entry) == f"single.safetensors [{registry.short_hash(entry)}]"  # the cache written anew


@pytest.mark.skipif(not (ROOT / "models" / DEFAULT_MODEL_NAME / "model_index.json").exists(),
                    reason="the embedded model is absent")
def test_the_app_starts_on_the_embedded_model_by_default(tmp_path):
    from webui.services import build_services

    (tmp_path / "my-models").mkdir()  # A1111 users point --ckpt-dir at their own models folder
    settings = parse_settings(["--outdir", str(tmp_path), "--device", "cpu", "--ckpt-dir", str(tmp_path / "my-models")],
                              environ={})
    services = build_services(settings)
    try:
        model = services.engine.model
        assert model is not None and model.entry.name == "sd-emoji-tiny" and model.entry.kind == "diffusers"
        assert (model.native_width, model.native_height) == (64, 64)
        job = services.worker.submit({"prompt": "red apple", "steps": 4, "seed": 3})
        assert job.wait(120) and job.error is None
        assert job.images[0].image.size == (64, 64) and "Model: sd-emoji-tiny" in job.images[0].infotext
    finally:
        services.close()


def test_listing_never_hashes_but_loading_does(tmp_path):
    (tmp_path / "big.safetensors").write_bytes(b"pretend these are 4 GB")
    registry = ModelRegistry(tmp_path, tmp_path / "cache" / "hashes.json")
    entry = registry.find("big")
    assert registry.title(entry) == "big.safetensors" and registry.short_hash(entry, cached_only=True) is None
    digest = registry.short_hash(entry)
    assert registry.title(entry) == f"big.safetensors [{digest}]"


def test_an_unreadable_weight_file_has_no_hash_instead_of_an_error(tmp_path):
    (tmp_path / "gone.safetensors").write_bytes(b"x")
    registry = ModelRegistry(tmp_path, tmp_path / "hashes.json")
    entry = registry.find("gone")
    (tmp_path / "gone.safetensors").unlink()
    assert registry.short_hash(entry) is None


def test_a_check_of_the_whole_request_is_not_put_under_a_made_up_field():
    with pytest.raises(InvalidRequest) as err:
        parse_request({"prompt": "ok", "sampler_name": "DDIM", "scheduler": "Karras"})
    assert str(err.value).startswith("sampler 'DDIM' does not support the Karras schedule")  # not "request: ..."


def test_a_path_starting_with_the_models_folder_is_found_from_another_working_folder(tmp_path, monkeypatch):
    models = tmp_path / "app" / "models"
    (models / "mine").mkdir(parents=True)
    (models / "mine" / "model_index.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # `python /path/app.py --ckpt models/mine` typed in another folder
    registry = ModelRegistry(models, tmp_path / "cache" / "hashes.json")
    found = registry.find("models/mine")
    assert (found.kind, found.name) == ("diffusers", "mine")
    assert registry.find("models/not-there").kind == "hub"  # nothing on disk: still a hub id, as before


def test_a_model_whose_name_ends_in_a_hash_like_bracket_is_found_by_it(tmp_path):
    """Found by a probe: "y [abcdef1234]" was listed but never found (the bracket was taken for an A1111 title's
    hash and stripped first)."""
    for name in ("y [abcdef1234]", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    registry = ModelRegistry(tmp_path, tmp_path / "cache" / "hashes.json")
    assert registry.find("y [abcdef1234]").name == "y [abcdef1234]"
    assert registry.find("y [0123456789]").name == "y"  # a title's hash still stripped where no model has it
