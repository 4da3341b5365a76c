"""Hub ids (`org/name`): find a Stable Diffusion (or SDXL) model in the Hugging Face cache, or download it there once.

A hub repository often holds far more than one pipeline needs (runwayml's SD 1.5 repository also has two
4-7 GB `.ckpt` files, fp16 and non-EMA copies and Flax weights), so only the diffusers layout is
fetched: `model_index.json`, each component's config and tokenizer files, and for each component one
set of weights: `.safetensors` before `.bin`, the fp16 variant when the model runs in half precision and
every component has one. Files land in the standard Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub), so
`hf download`, diffusers and this app all share them; a second start finds them there and
never touches the network. The download shows huggingface_hub's progress bars and logs every 10 %.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

log = logging.getLogger(__name__)

# Parts of pipelines other than SD 1.x/2.x and SDXL (SD3's, Flux's, PixArt's transformer). SDXL refiners are told
# apart by their model_index.json (loader.check_pipeline_folder), fetched before any weights.
NOT_SD_PARTS = ("transformer",)
CONFIG_EXTENSIONS = (".json", ".txt", ".model")  # configs, tokenizer vocab/merges, sentencepiece
# name[.variant][-00001-of-00002].ext, e.g. diffusion_pytorch_model.fp16.safetensors
_WEIGHT_NAME = re.compile(r"^(?P<base>[^.]+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d{5}-of-\d{5})?\.(?P<ext>safetensors|bin)$")
# Repositories that were taken down, and where the same weights live now.
MOVED_REPOS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}

ProgressCallback = Callable[[str, float], None]  # (description, fraction done 0..1)


class HubError(RuntimeError):
    """A hub model could not be found or fetched; the message says what to do instead."""


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str
    folder: Path  # the snapshot folder in the Hugging Face cache (a diffusers layout)
    variant: str | None  # "fp16" when the fp16 weight files are the ones to load
    downloaded: bool  # False when it was already in the cache


# --- where things are --------------------------------------------------------------------------------
def hub_cache_dir() -> Path:
    """The cache huggingface_hub uses, read from the environment now (not when it was first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_by_environment() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


# --- which files ---------------------------------------------------------------------------------------
def _weight_variant(filename: str) -> tuple[str | None, str] | None:
    """'unet/diffusion_pytorch_model.fp16.safetensors' -> ('fp16', '.safetensors'); None if not weights."""
    match = _WEIGHT_NAME.match(PurePosixPath(filename).name)
    if match is None:
        return None
    return match["variant"], "." + match["ext"]


def _component_weights(files: Iterable[str], skip: Iterable[str] = ()) -> dict[str, list[str]]:
    """Weight files grouped by component folder (top-level files and skipped folders left out)."""
    skip = set(skip)
    grouped: dict[str, list[str]] = {}
    for name in files:
        parts = PurePosixPath(name).parts
        if len(parts) != 2 or parts[0] in skip or _weight_variant(name) is None:
            continue
        grouped.setdefault(parts[0], []).append(name)
    return grouped


def pick_variant(files: Iterable[str], half: bool, skip: Iterable[str] = ()) -> str | None:
    """'fp16' when running in half precision and every component has fp16 weights (or only those)."""
    grouped = _component_weights(files, skip)
    if not grouped:
        return None

    def everywhere(variant: str | None) -> bool:
        return all(any(_weight_variant(f)[0] == variant for f in names) for names in grouped.values())

    if half and everywhere("fp16"):
        return "fp16"
    if everywhere(None):
        return None
    return "fp16" if everywhere("fp16") else None


def select_files(files: Iterable[str], half: bool, safety_checker: bool = True) -> tuple[list[str], str | None]:
    """The files of a hub repository that one diffusers pipeline needs, and the weight variant to load."""
    files = sorted(files)
    skip = () if safety_checker else ("safety_checker",)
    variant = pick_variant(files, half, skip)
    chosen = ["model_index.json"] if "model_index.json" in files else []
    for name in files:
        parts = PurePosixPath(name).parts
        if len(parts) == 2 and parts[0] not in skip and PurePosixPath(name).suffix in CONFIG_EXTENSIONS:
            chosen.append(name)  # configs, weight indexes, tokenizer files: all small
    for names in _component_weights(files, skip).values():
        by_kind: dict[tuple[str | None, str], list[str]] = {}
        for name in names:
            by_kind.setdefault(_weight_variant(name), []).append(name)
        # One set of weights per component: the wanted variant, safetensors first; plain weights as the
        # fall-back diffusers itself uses when a component lacks the variant.
        for kind in ((variant, ".safetensors"), (variant, ".bin"), (None, ".safetensors"), (None, ".bin"),
                     ("fp16", ".safetensors"), ("fp16", ".bin")):
            if kind in by_kind:
                chosen.extend(by_kind[kind])
                break
    return sorted(set(chosen)), variant


# --- the cache -----------------------------------------------------------------------------------------
def cached_snapshot(repo_id: str, half: bool, revision: str = "main") -> HubSnapshot | None:
    """The model's snapshot folder in the Hugging Face cache, or None when it was never downloaded.

    Reads the documented cache layout (models--org--name/refs/<revision> -> snapshots/<commit>/) itself,
    without the network; a snapshot that is incomplete fails later in from_pretrained, and the caller
    then downloads the missing files.
    """
    storage = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = storage / "snapshots" / commit
    if not (folder / "model_index.json").is_file():
        return None
    files = [str(p.relative_to(folder).as_posix()) for p in folder.rglob("*") if p.is_file()]
    return HubSnapshot(repo_id, folder, pick_variant(files, half), downloaded=False)


# --- the download --------------------------------------------------------------------------------------
HUB_TIMEOUT_SECONDS = 20.0  # for the hub's answer about a repository (the files themselves take longer)


def download_command(repo_id: str) -> str:
    """The `hf download` command that fetches what this app loads of a model (configs, tokenizer, one set of full
    weights per part), not the whole repository: SD 1.5's holds tens of GB of .ckpt copies and variants."""
    return (f'hf download {repo_id} --include "*.json" "*.txt" "*/diffusion_pytorch_model.safetensors" '
            '"*/model.safetensors"')


def download(repo_id: str, *, half: bool, safety_checker: bool = True, offline: bool = False,
             progress: ProgressCallback | None = None, check: Callable[[Path], None] | None = None) -> HubSnapshot:
    """Download the pipeline files of `repo_id` into the Hugging Face cache, or raise HubError.

    check: called with the snapshot folder once the small config files are there, before the weights;
    what it raises stops the download (an inpainting model is known by its UNet's config)."""
    if offline or offline_by_environment():
        why = "--offline is set" if offline else "HF_HUB_OFFLINE is set"
        raise HubError(
            f"{repo_id!r} is not in the Hugging Face cache ({hub_cache_dir()}) and {why}, so it cannot be "
            f"downloaded. On a machine with network run `{download_command(repo_id)}` (or start once without "
            "--offline) and copy the cache over, or put the model's .safetensors file in the models folder "
            "and pick it by name."
        )
    from huggingface_hub import HfApi

    try:
        # One request, no retry loop when offline; huggingface_hub waits forever by default, and a network
        # that takes the connection but never answers would keep the app from ever serving its page.
        info = HfApi(endpoint=_endpoint()).model_info(repo_id, timeout=HUB_TIMEOUT_SECONDS)
        files = [sibling.rfilename for sibling in info.siblings or []]
    except Exception as err:
        raise HubError(_explain(repo_id, err, reaching=True)) from err
    if "model_index.json" not in files:
        singles = [f for f in files if f.endswith((".safetensors", ".ckpt")) and "/" not in f]
        hint = (f" It holds single-file checkpoints ({', '.join(singles[:3])}): download one into the models "
                "folder and pick it by name.") if singles else ""
        raise HubError(f"{repo_id!r} is not a diffusers Stable Diffusion repository (no model_index.json).{hint}")
    if any(f.split("/")[0] in NOT_SD_PARTS for f in files):  # found before gigabytes are fetched
        raise HubError(f"{repo_id!r} is not an SD 1.x, 2.x or SDXL model (SD3, Flux, PixArt, ...); only those load "
                       "for now")
    wanted, variant = select_files(files, half=half, safety_checker=safety_checker)
    log.info("downloading %s (%d files%s) into %s", repo_id, len(wanted), ", fp16" if variant else "",
             hub_cache_dir())
    if check is not None:
        check(_fetch(repo_id, [name for name in wanted if PurePosixPath(name).suffix in CONFIG_EXTENSIONS]))
    folder = _fetch(repo_id, wanted, _progress_class(repo_id, progress))
    log.info("downloaded %s into %s", repo_id, folder)
    return HubSnapshot(repo_id, folder, variant, downloaded=True)


def _fetch(repo_id: str, files: list[str], progress_class=None) -> Path:
    """These files of the repository into the cache; the snapshot folder."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), allow_patterns=files,
                                      endpoint=_endpoint(), tqdm_class=progress_class))
    except Exception as err:
        raise HubError(_explain(repo_id, err, reaching=False)) from err


def _explain(repo_id: str, err: Exception, reaching: bool) -> str:
    """What went wrong with the hub, in words that say what to do."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(err, GatedRepoError):  # a subclass of RepositoryNotFoundError: test it first
        return (f"{repo_id!r} is gated: accept its licence on https://huggingface.co/{repo_id} and log in "
                "(`hf auth login`, or set HF_TOKEN), then try again.")
    if isinstance(err, RepositoryNotFoundError):
        moved = MOVED_REPOS.get(repo_id)
        hint = f" It has moved: use {moved!r}." if moved else (
            " Check the spelling (org/name); a private repository needs `hf auth login` or HF_TOKEN.")
        return f"{repo_id!r} was not found on the Hugging Face hub.{hint}"
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id!r} has no 'main' revision on the hub."
    if reaching:  # no network, DNS, proxy, hub down: the user's fix is the same
        return (f"could not reach the Hugging Face hub to download {repo_id!r} ({type(err).__name__}: {err}). "
                f"Check the network, or download it elsewhere (`{download_command(repo_id)}`) into the Hugging Face "
                "cache, or put a .safetensors file in the models folder and pick it by name; --offline skips "
                "the hub entirely.")
    return (f"downloading {repo_id!r} failed ({type(err).__name__}: {err}). Start again to resume: the files "
            "already fetched stay in the cache.")


def _progress_class(repo_id: str, callback: ProgressCallback | None):
    """huggingface_hub's own progress bars (live in a terminal or a notebook), plus log lines (a Space's
    log shows no live bars): every 10 % of the files, and every 512 MiB of bytes for big weights."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class LoggedProgress(hub_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Counted here too: a bar that is not shown (no terminal) does not count for itself.
            self._seen = getattr(self, "n", 0) or 0
            self._label = kwargs.get("desc") or "download"
            self._bytes = kwargs.get("unit") == "B"
            self._logged = -1

        def update(self, n=1):
            shown = super().update(n)
            self._seen += n or 0
            try:
                self._report()
            except Exception:  # a progress display must never break the download
                log.debug("progress report failed", exc_info=True)
            return shown

        def _report(self) -> None:
            total = getattr(self, "total", 0) or 0
            if self._bytes:
                # Byte totals grow while files start, so report amounts, not percentages.
                if self._label.startswith("Reconstruct"):
                    return
                step = int(self._seen // (512 * 2**20))
                if step > self._logged:
                    self._logged = step
                    if step:
                        log.info("%s: %.1f GB downloaded", repo_id, self._seen / 2**30)
                return
            if total <= 0:
                return
            fraction = min(1.0, self._seen / total)
            tenth = int(fraction * 10)
            if tenth > self._logged:
                self._logged = tenth
                log.info("%s: %s, %d%% done", repo_id, self._label, tenth * 10)
            if callback is not None:
                callback(f"{repo_id}: {self._label}", fraction)

    return LoggedProgress
