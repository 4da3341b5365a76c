"""Wire the long-lived services together from Settings: registry, engine, storage, worker.

app.py, the tests and the benchmarks all build the same graph through `build_services`, so there
is one place that knows how the parts connect.
"""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webui.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR, Settings
from webui.engine.generate import Engine
from webui.engine.loader import ModelLoadError
from webui.engine.merge import remove_stale_partials
from webui.engine.models import ModelNotFound, ModelRegistry
from webui.storage.history import History
from webui.storage.options import OptionsStore
from webui.storage.outputs import OutputStore
from webui.storage.styles import StyleStore
from webui.worker import Worker
from webui.zerogpu import wrap_engine

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    registry: ModelRegistry
    engine: Engine
    outputs: OutputStore
    history: History
    worker: Worker
    styles: StyleStore
    options: OptionsStore  # the Settings tab's, shared with /sdapi/v1/options
    starting_model: str = ""  # the model the start loaded or tried to (for messages when none loaded)

    def close(self, wait: float = 30.0) -> None:
        """Stop the worker (waiting up to `wait` seconds for what it is doing), then let go of the files."""
        self.worker.stop(wait)
        self.history.close()
        self.outputs.release()


def build_services(settings: Settings, *, load_model: bool = True) -> Services:
    """Create every service and start the worker; loads settings.ckpt unless told not to."""
    outdir = settings.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(settings.models_dir, hash_cache=outdir / "cache" / "model_hashes.json",
                             skipped=(settings.lora_folder, settings.embeddings_folder, settings.vae_folder,
                                      settings.esrgan_folder, settings.real_esrgan_folder, settings.blip_folder,
                                      settings.clip_folder, settings.controlnet_folder, settings.hypernetwork_folder))
    engine = wrap_engine(Engine(settings, registry))  # ZeroGPU Spaces only; a no-op elsewhere
    options = OptionsStore(settings.options_path, frozen=settings.freeze_settings,
                           starting=_starting_options(settings))
    _say_a1111_folders_are_not_followed(options, outdir)
    outputs = OutputStore(outdir, options)
    history = History(outdir / "history.sqlite3", outdir)
    alone = outputs.claim()
    if not alone:
        log.warning("another running server uses %s too; its unfinished jobs are left alone", outdir)
    _tidy_up(history, outputs, alone=alone, models_dir=Path(settings.models_dir))
    styles = StyleStore(settings.styles_path)
    worker = Worker(engine, outputs, history, max_queue=settings.queue_size, styles=styles, options=options).start()
    services = Services(settings, registry, engine, outputs, history, worker, styles, options)
    if load_model:
        try:
            registry.keep_listed(_load_starting_model(services).entry)
        except (ModelLoadError, ModelNotFound) as err:
            # The app still starts: the user can pick another model in the UI.
            log.error("%s", err)
        except KeyboardInterrupt:  # Ctrl+C during a long first download: let go of the outputs folder now
            services.close(wait=1)
            raise
    return services


def _load_starting_model(services: Services):
    """The model loaded last (A1111's sd_model_checkpoint in the settings file) when --ckpt names none, if it is
    still in the models folder (never a download); else --ckpt's (the embedded model by default)."""
    settings, registry = services.settings, services.registry
    remembered = services.options.remembered(("sd_model_checkpoint",)).get("sd_model_checkpoint")
    if settings.ckpt_from_options and isinstance(remembered, str) and remembered.strip():
        try:
            entry = registry.find_listed(remembered)
            services.starting_model = entry.name
            return services.worker.load_model(entry.name)
        except (ModelNotFound, ModelLoadError) as err:
            log.warning("the model loaded last (sd_model_checkpoint in %s) is not started: %s; loading %s instead",
                        settings.options_path, err, settings.ckpt)
    services.starting_model = settings.ckpt
    # --ckpt's model is the next start's too; the default one (no --ckpt) leaves the remembered model as it was, so a
    # models folder missing for a start (a drive not mounted) does not lose it
    return _load_named_model(services.worker, registry, settings.ckpt, remember=not settings.ckpt_from_options)


def _load_named_model(worker: Worker, registry: ModelRegistry, name: str, remember: bool = True):
    """The model --ckpt names; one that is nowhere falls back to the first model of the models folder that loads,
    then the embedded model, as A1111 loads a fallback, so that the server starts ready to generate. A fallback is
    never remembered as the next start's model."""
    try:
        return worker.load_model(name, remember=remember)
    except ModelNotFound as err:
        shipped = DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME
        listed = [entry.name for entry in registry.entries()] + ([str(shipped)] if shipped.is_dir() else [])
        fallbacks = [fallback for fallback in listed if fallback != name]
        if not fallbacks:
            raise
        for fallback in fallbacks:  # the first that loads
            log.warning("%s; loading %s instead", err, fallback)
            try:
                return worker.load_model(fallback, remember=False)
            except (ModelNotFound, ModelLoadError) as failed:
                err = failed
        raise err


# A1111's output folder settings and their defaults (relative to its own folder): this server's layout is fixed.
_A1111_FOLDERS = {"outdir_samples": "", "outdir_txt2img_samples": "outputs/txt2img-images",
                  "outdir_img2img_samples": "outputs/img2img-images", "outdir_extras_samples": "outputs/extras-images",
                  "outdir_grids": "", "outdir_txt2img_grids": "outputs/txt2img-grids",
                  "outdir_img2img_grids": "outputs/img2img-grids", "outdir_save": "log/images",
                  "outdir_init_images": "outputs/init-images"}


def _say_a1111_folders_are_not_followed(options: OptionsStore, outdir: Path) -> None:
    """An A1111 settings file (--ui-settings-file) that sends images elsewhere: say where they go instead."""
    moved = {key: value for key, value in options.remembered(tuple(_A1111_FOLDERS)).items()
             if value and value != _A1111_FOLDERS[key]}
    if moved:
        log.warning("the settings file's output folders (%s) are A1111's and not followed: images go to %s, in "
                    "txt2img-images, img2img-images, extras-images and the grids' folders (--outdir)",
                    ", ".join(f"{key} = {value!r}" for key, value in moved.items()), outdir)


def _starting_options(settings: Settings) -> dict[str, Any]:
    """The settings the command line starts the server with, over the settings file's."""
    if settings.preview_every is None:
        return {}
    return {"show_progress_every_n_steps": settings.preview_every, "live_previews_enable": settings.preview_every > 0}


def _tidy_up(history: History, outputs: OutputStore, alone: bool, models_dir: Path) -> None:
    """Bring the history in line with the outputs folder and the last stop, and remove files a crash left. `alone`:
    no other running server shares the folder, so unfinished jobs and partial files are a crash's, not its work."""
    try:
        repaired = history.reconcile(fail_unfinished_jobs=alone)
    except sqlite3.OperationalError as err:  # locked by another program, or a full disk: no reason not to start
        log.warning("the history could not be checked against the outputs folder (%s: is another program writing "
                    "to the database, or is the disk full?); the next start tries again. Jobs run as usual and say "
                    "what they could not record", err)
        repaired = {}
    # beside another server, only old partial files are surely a crash's
    repaired["partial_files_removed"] = outputs.remove_partial_files(older_than=0.0 if alone else 3600.0)
    repaired["unfinished_merges_removed"] = remove_stale_partials(models_dir) if models_dir.is_dir() else 0
    if any(repaired.values()):
        log.warning("history brought in line with the outputs folder and the last stop: %s", repaired)
