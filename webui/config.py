"""Settings: parsed once in app.py from command-line flags (and a few environment variables), then passed down.

Flag names follow stable-diffusion-webui where one exists, so users' launch scripts keep working.
Nothing here is a module-level mutable global: every service receives the Settings it needs.

Where no command line can be given (a Hugging Face Space runs plain `python app.py`), environment
variables fill in. Precedence, highest first:
  1. flags on the command line
  2. WEBUI_ARGS, extra flags in one variable, e.g. "--api --no-half-vae"
  3. COMMANDLINE_ARGS, the same for A1111's variable, so an existing webui-user.sh setup carries over
  4. WEBUI_CKPT, WEBUI_CKPT_DIR, WEBUI_OUTDIR, WEBUI_GRADIO_AUTH, WEBUI_API_AUTH (secrets belong here)
  5. what the platform says: on a Space (SPACE_ID set) the server listens on 0.0.0.0 and images go to
     /data/outputs when the Space has persistent storage; elsewhere GRADIO_SERVER_NAME is the address
     to serve on; GRADIO_SERVER_PORT is the port
  6. the built-in defaults

Many stable-diffusion-webui flags that mean nothing here (--skip-torch-cuda-test, --theme dark, ...) are
accepted with one warning, so A1111 launch lines start; a flag nobody knows (a typo) is still an error.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from webui.engine.models import (  # A1111's folder names
    BLIP_FOLDER, CLIP_FOLDER, CODEFORMER_FOLDER, CONTROLNET_FOLDER, EMBEDDINGS_FOLDER, ESRGAN_FOLDER, GFPGAN_FOLDER,
    HYPERNETWORKS_FOLDER, LORA_FOLDER, REAL_ESRGAN_FOLDER, TAESD_FOLDER, VAE_FOLDER)
from webui.zerogpu import zerogpu_requested

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTIFICATION_AUDIO = "notification.mp3"  # A1111's name: put one beside app.py, and the page plays it after each run
DEFAULT_MODELS_DIR = PROJECT_ROOT / "models"
DEFAULT_OUTPUTS_DIR = PROJECT_ROOT / "outputs"
DEFAULT_MODEL_NAME = "sd-emoji-tiny"
DEFAULT_TEMPLATES_DIR = Path(__file__).resolve().parent / "textual_inversion_templates"  # Train's prompt templates
DEVICES = ("auto", "cuda", "mps", "cpu")
SPACES_DATA_DIR = Path("/data")  # a Space's persistent storage, when the owner has added it

# Environment variable -> the flag's destination (flags on the command line win over these).
ENV_OVERRIDES = {
    "WEBUI_CKPT": "ckpt",
    "WEBUI_CKPT_DIR": "models_dir",
    "WEBUI_OUTDIR": "outdir",
    "WEBUI_GRADIO_AUTH": "gradio_auth",
    "WEBUI_API_AUTH": "api_auth",
}
ENV_ARGS = "WEBUI_ARGS"
A1111_ENV_ARGS = "COMMANDLINE_ARGS"
A1111_CHECKPOINTS = "Stable-diffusion"  # where A1111 keeps checkpoints inside its models folder
STYLES_FILE = "styles.csv"  # A1111's prompt styles, in its own folder
SETTINGS_FILE = "config.json"  # A1111's name for the file of the Settings tab

# stable-diffusion-webui flags about who may reach the server, or how, or what may be changed there: this app cannot
# do what they ask, and serving without a login file, TLS or frozen settings the user asked for is worse than not
# starting, so they stop the start with a sentence saying so. Listed for GET /sdapi/v1/cmd-flags and the tests.
A1111_REFUSED_FLAGS = ("--gradio-auth-path", "--tls-keyfile", "--tls-certfile", "--ngrok", "--subpath",
                       "--cors-allow-origins", "--cors-allow-origins-regex", "--freeze-specific-settings",
                       "--freeze-settings-in-sections")
# stable-diffusion-webui flags that do nothing here. They are accepted (with one warning naming them) so an
# A1111 launch line or COMMANDLINE_ARGS still starts.
A1111_IGNORED_SWITCHES = (
    # installing and checking the environment (A1111's launch.py)
    "--skip-torch-cuda-test", "--skip-python-version-check", "--skip-version-check", "--skip-install",
    "--skip-prepare-environment", "--reinstall-torch", "--reinstall-xformers", "--update-check",
    "--update-all-extensions", "--no-download-sd-model", "--do-not-download-clip", "--log-startup",
    # precision, attention and memory choices diffusers makes itself here
    "--upcast-sampling", "--lowram", "--medvram-sdxl", "--always-batch-cond-uncond", "--opt-split-attention",
    "--opt-split-attention-v1", "--opt-split-attention-invokeai", "--opt-sub-quad-attention",
    "--opt-sdp-attention", "--opt-sdp-no-mem-attention", "--disable-opt-split-attention", "--opt-channelslast",
    "--xformers-flash-attention", "--disable-nan-check", "--disable-model-loading-ram-optimization",
    "--no-hashing",
    # UI, extensions and logging features this project does not have
    "--enable-insecure-extension-access", "--disable-all-extensions", "--disable-extra-extensions",
    "--allow-code", "--administrator", "--disable-safe-unpickle", "--autolaunch", "--api-log",
    "--gradio-queue", "--no-gradio-queue", "--gradio-debug", "--no-progressbar-hiding",
    "--disable-console-progressbars", "--enable-console-prompts", "--use-textbox-seed",
    "--ui-debug-mode", "--add-stop-route", "--api-server-stop",
    "--skip-load-model-at-start", "--deepdanbooru", "--show-negative-prompt", "--unload-gfpgan",
    "--test-server", "--disable-tls-verify",  # the latter only matters with TLS, which is refused (see above)
    "--no-prompt-history", "--unix-filenames-sanitization", "--use-ipex",
    "-f",  # webui.sh's "allow running as root", often left in COMMANDLINE_ARGS
)
A1111_IGNORED_VALUES = (  # these take one value, which is dropped too
    "--precision", "--theme", "--device-id", "--data-dir", "--config", "--vae-path", "--ui-config-file",
    "--localizations-dir", "--max-batch-count", "--loglevel", "--timeout-keep-alive", "--filenames-max-length",
    # folders of models and tools this project does not use (LoRA, upscalers, face restorers, CLIP)
    "--lyco-dir", "--lyco-dir-backcompat", "--gfpgan-dir", "--gfpgan-model",
    "--bsrgan-models-path", "--scunet-models-path", "--swinir-models-path", "--ldsr-models-path",
    "--dat-models-path",
    "--sub-quad-q-chunk-size", "--sub-quad-kv-chunk-size", "--sub-quad-chunk-threshold",
    "--gradio-img2img-tool", "--gradio-inpaint-tool", "--ngrok-region",
    # more folders Gradio may serve: this app serves only its two image folders
    "--gradio-allowed-path",
)

log = logging.getLogger(__name__)


@dataclass
class Settings:
    listen: bool = False
    server_name: str | None = None  # --server-name or GRADIO_SERVER_NAME: an address; wins over listen, as in A1111
    port: int = 7860
    share: bool = False
    api: bool = False
    nowebui: bool = False
    gradio_auth: list[tuple[str, str]] = field(default_factory=list)
    api_auth: list[tuple[str, str]] = field(default_factory=list)
    models_dir: Path = DEFAULT_MODELS_DIR
    lora_dir: Path | None = None  # None: the Lora folder inside models_dir
    embeddings_dir: Path | None = None  # None: the embeddings folder inside models_dir
    vae_dir: Path | None = None  # None: the VAE folder inside models_dir
    esrgan_dir: Path | None = None  # None: the ESRGAN folder inside models_dir
    real_esrgan_dir: Path | None = None  # None: the RealESRGAN folder inside models_dir
    gfpgan_dir: Path | None = None  # None: the GFPGAN folder inside models_dir (also the face detector's file)
    codeformer_dir: Path | None = None  # None: the Codeformer folder inside models_dir
    blip_dir: Path | None = None  # None: the BLIP folder inside models_dir (Interrogate's captioning model)
    clip_dir: Path | None = None  # None: the CLIP folder inside models_dir (Interrogate's CLIP model)
    controlnet_dir: Path | None = None  # None: the ControlNet folder inside models_dir
    hypernetwork_dir: Path | None = None  # None: the hypernetworks folder inside models_dir
    textual_inversion_templates_dir: Path = DEFAULT_TEMPLATES_DIR  # the Train tab's prompt templates
    styles_file: Path | None = None  # None: styles.csv in outdir
    ui_settings_file: Path | None = None  # None: config.json in outdir
    freeze_settings: bool = False  # the Settings tab's settings shown, not changeable
    hide_ui_dir_config: bool = False  # no server folders typed into the page (img2img Batch's)
    outdir: Path = DEFAULT_OUTPUTS_DIR
    ckpt: str = DEFAULT_MODEL_NAME
    # No --ckpt given: start with the model the settings file remembers (A1111's sd_model_checkpoint), else `ckpt`
    ckpt_from_options: bool = False
    device: str = "auto"
    no_half: bool = False
    no_half_vae: bool = False
    medvram: bool = False
    lowvram: bool = False
    xformers: bool = False
    no_safety_checker: bool = False
    offline: bool = False
    compile: bool | None = None  # None: on for a CUDA GPU where safe (fast_path.compile_choice)
    queue_size: int = 64
    preview_every: int | None = None  # --preview-every: the Settings tab's Live preview display period at start
    notification_audio: Path | None = None  # played by the page when a run ends, where the file exists

    @property
    def lora_folder(self) -> Path:
        return self.lora_dir or self.models_dir / LORA_FOLDER

    @property
    def vae_folder(self) -> Path:
        return self.vae_dir or self.models_dir / VAE_FOLDER

    @property
    def esrgan_folder(self) -> Path:
        return self.esrgan_dir or self.models_dir / ESRGAN_FOLDER

    @property
    def real_esrgan_folder(self) -> Path:
        return self.real_esrgan_dir or self.models_dir / REAL_ESRGAN_FOLDER

    @property
    def gfpgan_folder(self) -> Path:
        return self.gfpgan_dir or self.models_dir / GFPGAN_FOLDER

    @property
    def codeformer_folder(self) -> Path:
        return self.codeformer_dir or self.models_dir / CODEFORMER_FOLDER

    @property
    def blip_folder(self) -> Path:
        return self.blip_dir or self.models_dir / BLIP_FOLDER

    @property
    def clip_folder(self) -> Path:
        return self.clip_dir or self.models_dir / CLIP_FOLDER

    @property
    def controlnet_folder(self) -> Path:
        return self.controlnet_dir or self.models_dir / CONTROLNET_FOLDER

    @property
    def hypernetwork_folder(self) -> Path:
        return self.hypernetwork_dir or self.models_dir / HYPERNETWORKS_FOLDER

    @property
    def embeddings_folder(self) -> Path:
        return self.embeddings_dir or self.models_dir / EMBEDDINGS_FOLDER

    @property
    def taesd_folder(self) -> Path:
        return self.models_dir / TAESD_FOLDER

    @property
    def styles_path(self) -> Path:
        return self.styles_file or self.outdir / STYLES_FILE

    @property
    def options_path(self) -> Path:
        return self.ui_settings_file or self.outdir / SETTINGS_FILE

    @property
    def host(self) -> str:
        return self.server_name or ("0.0.0.0" if self.listen else "127.0.0.1")

    @property
    def all_interfaces(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    @property
    def public(self) -> bool:
        """Served to other machines (--listen, --share, or an address that is not this machine's loopback),
        where visitors may not be trusted."""
        return self.share or not _loopback(self.host)

    @property
    def open_to_anyone(self) -> bool:
        """Served to other machines with no login: whoever finds the address uses the page, so nothing there may
        change what other users have (delete their images, change everyone's settings)."""
        return self.public and not self.gradio_auth

    @property
    def reads_server_folders(self) -> bool:
        """Whether the page may read a server folder typed into it (img2img Batch's Input directory): not where
        anyone who finds the page would read the server's files, nor with --hide-ui-dir-config."""
        return not (self.open_to_anyone or self.hide_ui_dir_config)

    @property
    def api_enabled(self) -> bool:
        return self.api or self.nowebui

    @property
    def api_credentials(self) -> list[tuple[str, str]]:
        """Who may use the REST API: the --api-auth users, else the --gradio-auth ones, so that a login
        in front of the UI is never walked around through the API."""
        return self.api_auth or self.gradio_auth

    def api_access(self) -> str:
        """One line for the start-up log on who may use the REST API."""
        if self.api_auth:
            return "REST API login: the --api-auth users"
        if self.gradio_auth:
            return "REST API login: the --gradio-auth users (give --api-auth for other API users)"
        if self.public:
            return ("WARNING: the REST API has no login and anyone who reaches this address can use it; "
                    "add --api-auth user:password")
        return "REST API: no login (this machine only)"


def parse_credentials(text: str | None) -> list[tuple[str, str]]:
    """'user:pass,user2:pass2' -> [("user", "pass"), ("user2", "pass2")]."""
    if not text:
        return []
    pairs = []
    for number, item in enumerate(text.split(","), start=1):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            # Never echo the text: it may hold a password, and this message goes to the log.
            raise ValueError(f"credentials must look like user:password[,user2:password2]; entry {number} does not")
        pairs.append((user, password))
    return pairs


def _loopback(host: str) -> bool:
    """True for an address only this machine reaches; a host name other than localhost counts as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Ignored(argparse.Action):
    """An A1111 flag with no meaning here: remember its name for the warning, drop its value."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.ignored = [*namespace.ignored, self.option_strings[0]]


class _Refused(argparse.Action):
    """An A1111 flag this app cannot honour safely (A1111_REFUSED_FLAGS): the start stops, saying why."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is a stable-diffusion-webui flag about who may reach the server or what may be "
                     "changed there, which this app cannot do; it stops rather than serve without it. Leave it out: "
                     "--gradio-auth and --api-auth give a login, a reverse proxy gives TLS or a sub-path, and "
                     "--freeze-settings freezes every setting.")


def _user_path(text: str) -> Path:
    """A folder flag's value; ~ is expanded here, since a shell leaves it alone inside WEBUI_ARGS or --flag=~/x."""
    return Path(text).expanduser()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="app.py",
        allow_abbrev=False,  # else a refused flag passes as the start of an ignored one (--ngrok of --ngrok-region)
        description="diffusers-webui: a Stable Diffusion web UI and A1111-compatible API on diffusers.",
        epilog=f"Flags can also come from {ENV_ARGS} and {A1111_ENV_ARGS} (the command line wins). Other "
               "stable-diffusion-webui flags that do nothing here (--skip-torch-cuda-test, --precision full, "
               "--theme dark, ...) are accepted and named in a warning.",
    )
    net = p.add_argument_group("network")
    net.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 instead of 127.0.0.1")
    net.add_argument("--server-name", metavar="HOST",
                     help="serve on this address instead (wins over --listen, as in A1111) (env: GRADIO_SERVER_NAME)")
    net.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    net.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    net.add_argument("--api", action="store_true", help="also serve the A1111-compatible REST API under /sdapi/v1")
    net.add_argument("--nowebui", action="store_true", help="serve only the REST API, no web UI")
    net.add_argument("--gradio-auth", metavar="USER:PASS[,...]",
                     help="put a login page in front of the web UI (env: WEBUI_GRADIO_AUTH)")
    net.add_argument("--api-auth", metavar="USER:PASS[,...]",
                     help="protect every API route with HTTP Basic auth (default: the --gradio-auth users) "
                          "(env: WEBUI_API_AUTH)")

    files = p.add_argument_group("models and files")
    files.add_argument("--ckpt-dir", dest="models_dir", type=_user_path, default=None,
                       help="folder scanned for models (diffusers folders, .safetensors, .ckpt) "
                            "(default: models/) (env: WEBUI_CKPT_DIR)")
    files.add_argument("--models-dir", dest="models_base", type=_user_path,
                       help=f"A1111's models folder: models are read from DIR/{A1111_CHECKPOINTS} when it exists, "
                            "else from DIR (--ckpt-dir wins)")
    files.add_argument("--lora-dir", type=_user_path, default=None,
                       help=f"folder of LoRA files that prompts name as <lora:name:0.8> (default: {LORA_FOLDER}/ "
                            "inside the models folder, or beside Stable-diffusion/ with --models-dir)")
    files.add_argument("--vae-dir", type=_user_path, default=None,
                       help=f"folder of VAE files (.safetensors, .pt, .ckpt) the SD VAE list offers (default: "
                            f"{VAE_FOLDER}/ inside the models folder, or beside Stable-diffusion/ with --models-dir)")
    files.add_argument("--esrgan-models-path", dest="esrgan_dir", type=_user_path, default=None,
                       help=f"folder of ESRGAN upscaler files (.pth, .safetensors), each listed by its file name "
                            f"(default: {ESRGAN_FOLDER}/ inside the models folder, or beside Stable-diffusion/ with "
                            "--models-dir)")
    files.add_argument("--realesrgan-models-path", dest="real_esrgan_dir", type=_user_path, default=None,
                       help=f"folder of Real-ESRGAN upscaler files, where R-ESRGAN 4x+ and its kin are downloaded "
                            f"when first used (default: {REAL_ESRGAN_FOLDER}/ beside {ESRGAN_FOLDER}/)")
    files.add_argument("--gfpgan-models-path", dest="gfpgan_dir", type=_user_path, default=None,
                       help=f"folder of GFPGAN's file (GFPGANv1.4.pth) and of the face detector Restore faces uses "
                            f"(detection_Resnet50_Final.pth), each downloaded when first used (default: {GFPGAN_FOLDER}/ "
                            f"beside {ESRGAN_FOLDER}/)")
    files.add_argument("--codeformer-models-path", dest="codeformer_dir", type=_user_path, default=None,
                       help=f"folder of CodeFormer's file (codeformer-v0.1.0.pth), downloaded when first used "
                            f"(default: {CODEFORMER_FOLDER}/ beside {ESRGAN_FOLDER}/)")
    files.add_argument("--clip-models-path", dest="clip_dir", type=_user_path, default=None,
                       help=f"folder of the CLIP model Interrogate ranks words with, in transformers' layout; when it "
                            f"holds no config.json, OpenAI's CLIP ViT-L/14 is downloaded once into the hub cache (default: "
                            f"{CLIP_FOLDER}/ beside {ESRGAN_FOLDER}/; the captioning model is read from {BLIP_FOLDER}/ "
                            "beside it)")
    files.add_argument("--controlnet-dir", type=_user_path, default=None,
                       help=f"folder of ControlNet models (diffusers folders, .safetensors, .pth), listed as "
                            f"'name [hash]' (default: {CONTROLNET_FOLDER}/ inside the models folder, or beside "
                            "Stable-diffusion/ with --models-dir)")
    files.add_argument("--hypernetwork-dir", type=_user_path, default=None,
                       help=f"folder of A1111's hypernetwork files (.pt) that prompts name as <hypernet:name:0.6> "
                            f"(default: {HYPERNETWORKS_FOLDER}/ inside the models folder, or beside Stable-diffusion/ "
                            "with --models-dir)")
    files.add_argument("--embeddings-dir", type=_user_path, default=None,
                       help=f"folder of textual inversion embeddings that prompts name by file name (default: "
                            f"{EMBEDDINGS_FOLDER}/ inside the models folder, or A1111's embeddings/ beside its models/ "
                            "with --models-dir)")
    files.add_argument("--textual-inversion-templates-dir", type=_user_path, default=DEFAULT_TEMPLATES_DIR,
                       help="folder of the Train tab's prompt templates (.txt files whose lines hold [name] and "
                            "[filewords]) (default: the ones shipped in webui/textual_inversion_templates/)")
    files.add_argument("--styles-file", type=_user_path, default=None,
                       help=f"A1111's prompt styles file (default: {STYLES_FILE} in the outputs folder, or A1111's own "
                            "beside its models/ with --models-dir when it has one)")
    files.add_argument("--ui-settings-file", type=_user_path, default=None,
                       help=f"the Settings tab's file, as A1111's (default: {SETTINGS_FILE} in the outputs folder); "
                            "A1111's own may be named: the keys this server does not use are kept")
    files.add_argument("--freeze-settings", action="store_true",
                       help="the Settings tab shows the settings but nobody can change them, there or through "
                            "/sdapi/v1/options (as A1111's)")
    files.add_argument("--hide-ui-dir-config", action="store_true",
                       help="no server folders in the page: img2img Batch takes uploads only (as A1111's; also so "
                            "wherever the page is served to other machines without --gradio-auth)")
    files.add_argument("--notification-audio", type=_user_path, default=PROJECT_ROOT / NOTIFICATION_AUDIO,
                       help=f"a sound the page plays when a run ends, where the file exists (default: A1111's "
                            f"{NOTIFICATION_AUDIO} beside app.py)")
    files.add_argument("--outdir", type=_user_path, default=DEFAULT_OUTPUTS_DIR,
                       help="where images and the history database are written (env: WEBUI_OUTDIR; "
                            "on a Space with persistent storage: /data/outputs)")
    files.add_argument("--ckpt", default=None,
                       help="model to load at start: a name in the models folder, a path, or a hub id "
                            f"(default: the model last loaded, as A1111's settings file keeps it, else the embedded "
                            f"{DEFAULT_MODEL_NAME}) (env: WEBUI_CKPT)")
    files.add_argument("--offline", action="store_true", help="never contact the model hub")

    dev = p.add_argument_group("device, precision and memory")
    dev.add_argument("--device", choices=DEVICES, default="auto", help="where to run the model (default auto)")
    dev.add_argument("--no-half", action="store_true", help="run the whole model in fp32 (slower, more memory)")
    dev.add_argument("--no-half-vae", action="store_true", help="decode the VAE in fp32 (avoids black images)")
    dev.add_argument("--medvram", action="store_true", help="keep only the running model part on the GPU")
    dev.add_argument("--lowvram", action="store_true", help="move layers to the GPU one at a time (slowest)")
    dev.add_argument("--xformers", "--force-enable-xformers", action="store_true",
                     help="use xformers attention when installed")
    dev.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="compile the UNet and VAE decoder with torch.compile (default: on for a CUDA GPU with "
                          "Triton, off elsewhere; the first start at each size compiles, later starts reuse "
                          "the cache in OUTDIR/cache/torch-compile)")
    dev.add_argument("--no-safety-checker", action="store_true", help="do not load or run the safety checker")

    q = p.add_argument_group("queue")
    q.add_argument("--queue-size", type=int, default=64, help="most jobs waiting at once (default 64)")
    q.add_argument("--preview-every", type=int, default=None,
                   help="start with a live preview every N denoising steps, 0 to 32 (0: none) over the Settings "
                        "tab's Live preview display period, which can change it later (default: the setting's, 5)")

    # A1111's flags that do nothing here: hidden from --help (the epilog mentions them), named in a warning.
    p.set_defaults(ignored=[])
    for flag in A1111_IGNORED_SWITCHES:
        p.add_argument(flag, action=_Ignored, dest="ignored", nargs=0, help=argparse.SUPPRESS)
    for flag in A1111_IGNORED_VALUES:
        p.add_argument(flag, action=_Ignored, dest="ignored", help=argparse.SUPPRESS)
    for flag in A1111_REFUSED_FLAGS:
        p.add_argument(flag, action=_Refused, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    # --use-cpu all (or sd) is A1111's way to run the model on the CPU; other values name parts we do not have.
    p.add_argument("--use-cpu", nargs="+", type=str.lower, default=[], help=argparse.SUPPRESS)
    return p


def parse_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags (argv, default sys.argv[1:]) over environment variables (environ, default os.environ)."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    try:
        env_defaults = environment_defaults(environ)
    except ValueError as err:
        parser.error(str(err))
    ckpt_dir_env = env_defaults.pop("models_dir", None)  # applied below, so that --models-dir beats it
    parser.set_defaults(**env_defaults)
    argv = list(sys.argv[1:] if argv is None else argv)
    env_flags: dict[str, list[str]] = {}
    for name in (A1111_ENV_ARGS, ENV_ARGS):  # in this order, so that WEBUI_ARGS beats COMMANDLINE_ARGS
        try:
            env_flags[name] = shlex.split(environ.get(name, ""))
        except ValueError as err:
            parser.error(f"{name} could not be read as flags: {err}")
    # Later flags win, so the command line beats both variables.
    args, unknown = parser.parse_known_args([*env_flags[A1111_ENV_ARGS], *env_flags[ENV_ARGS], *argv])
    if unknown:  # argparse's own message, plus which variable held the flag when one did
        where = [name for name, flags in env_flags.items() if set(unknown) & set(flags)]
        source = f" (set in {', '.join(where)})" if where else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{source}")
    _apply_a1111_flags(args)
    _choose_models_dir(args, ckpt_dir_env)
    _choose_address(args, parser, environ)
    gradio_auth = _credentials(parser, args.gradio_auth, "--gradio-auth", "WEBUI_GRADIO_AUTH", env_defaults)
    api_auth = _credentials(parser, args.api_auth, "--api-auth", "WEBUI_API_AUTH", env_defaults)
    if args.queue_size < 1:
        parser.error("--queue-size must be at least 1")
    if args.preview_every is not None and not 0 <= args.preview_every <= 32:
        parser.error("--preview-every must be 0 (no previews) to 32")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be between 1 and 65535, not {args.port}")
    problem = _unwritable(args.outdir)
    if problem:
        parser.error(f"--outdir {args.outdir}: {problem}; pass a folder you can write to")
    args.ckpt_from_options = args.ckpt is None
    args.ckpt = args.ckpt or DEFAULT_MODEL_NAME
    if args.ckpt == DEFAULT_MODEL_NAME and not (args.models_dir / DEFAULT_MODEL_NAME).exists():
        # --ckpt-dir elsewhere without --ckpt: the embedded model still starts, from where it ships.
        args.ckpt = str(DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME)
    values = vars(args) | {"gradio_auth": gradio_auth, "api_auth": api_auth}
    if on_spaces(environ) and values["share"]:
        log.warning("--share is ignored on a Hugging Face Space: the Space's own address is already public")
        values["share"] = False
    if values["nowebui"] and zerogpu_requested(environ):
        # spaces.GPU lends the GPU through Gradio's app; without it every image would fail.
        parser.error("--nowebui cannot run on ZeroGPU, which lends its GPU through the web UI: drop --nowebui "
                     "and add --api to serve the API next to the UI")
    if values["nowebui"] and values["share"]:
        # Gradio makes the share link for the web UI; the API-only server has no way to get one.
        log.warning("--share is ignored with --nowebui: a public share link needs the web UI "
                    "(drop --nowebui and use --api to serve the API through it)")
        values["share"] = False
    return Settings(**values)


def _apply_a1111_flags(args: argparse.Namespace) -> None:
    """--use-cpu all means --device cpu; every other A1111-only flag is named in one warning."""
    ignored = list(dict.fromkeys(args.ignored))
    if {"all", "sd"} & set(args.use_cpu):
        if args.device == "auto":
            args.device = "cpu"
    elif args.use_cpu:
        ignored.append("--use-cpu")
    if ignored:
        hint = " (for fp32 everywhere use --no-half)" if "--precision" in ignored and not args.no_half else ""
        log.warning("ignored: these stable-diffusion-webui flags do nothing here: %s%s", ", ".join(ignored), hint)
    del args.ignored, args.use_cpu


def _choose_models_dir(args: argparse.Namespace, ckpt_dir_env: Path | None) -> None:
    """--ckpt-dir, else A1111's models folder (--models-dir: its Stable-diffusion/ when there is one), else
    WEBUI_CKPT_DIR, else models/."""
    base = args.models_base
    if args.models_dir is None and base is not None:
        args.models_dir = base / A1111_CHECKPOINTS if (base / A1111_CHECKPOINTS).is_dir() else base
    if args.models_dir is None:
        args.models_dir = ckpt_dir_env or DEFAULT_MODELS_DIR
    if args.lora_dir is None:  # A1111 keeps models/Lora beside models/Stable-diffusion
        args.lora_dir = (base if base is not None else args.models_dir) / LORA_FOLDER
    if args.vae_dir is None:  # and models/VAE
        args.vae_dir = (base if base is not None else args.models_dir) / VAE_FOLDER
    if args.esrgan_dir is None:  # and models/ESRGAN, models/RealESRGAN
        args.esrgan_dir = (base if base is not None else args.models_dir) / ESRGAN_FOLDER
    if args.real_esrgan_dir is None:
        args.real_esrgan_dir = (base if base is not None else args.models_dir) / REAL_ESRGAN_FOLDER
    if args.gfpgan_dir is None:  # and models/GFPGAN, models/Codeformer
        args.gfpgan_dir = (base if base is not None else args.models_dir) / GFPGAN_FOLDER
    if args.codeformer_dir is None:
        args.codeformer_dir = (base if base is not None else args.models_dir) / CODEFORMER_FOLDER
    args.blip_dir = (base if base is not None else args.models_dir) / BLIP_FOLDER  # A1111's models/BLIP: no flag
    if args.clip_dir is None:
        args.clip_dir = (base if base is not None else args.models_dir) / CLIP_FOLDER
    if args.controlnet_dir is None:  # and models/ControlNet, the extension's folder
        args.controlnet_dir = (base if base is not None else args.models_dir) / CONTROLNET_FOLDER
    if args.hypernetwork_dir is None:  # and models/hypernetworks
        args.hypernetwork_dir = (base if base is not None else args.models_dir) / HYPERNETWORKS_FOLDER
    a1111 = base is not None and (base / A1111_CHECKPOINTS).is_dir()
    if args.embeddings_dir is None:  # and its embeddings/ beside models/
        args.embeddings_dir = base.parent / EMBEDDINGS_FOLDER if a1111 else args.models_dir / EMBEDDINGS_FOLDER
    if args.styles_file is None and a1111 and (base.parent / STYLES_FILE).is_file():  # A1111's own styles
        args.styles_file = base.parent / STYLES_FILE
    if not args.models_dir.is_dir():  # a typo here would otherwise show as an empty model list, and no word why
        log.warning("the models folder %s does not exist, so no models are listed from it: check --ckpt-dir "
                    "(or --models-dir, WEBUI_CKPT_DIR)", args.models_dir)
    del args.models_base


def _choose_address(args: argparse.Namespace, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """--server-name, else --listen, else what the platform says (a Space, GRADIO_SERVER_NAME)."""
    if args.server_name is not None and not args.server_name.strip():
        parser.error("--server-name needs an address, e.g. 0.0.0.0 or 192.168.1.5")
    if args.server_name is None and not args.listen:
        if on_spaces(environ):
            args.listen = True  # a Space must listen on 0.0.0.0 (its runtime sets GRADIO_SERVER_NAME so too)
        else:
            args.server_name = environ.get("GRADIO_SERVER_NAME", "").strip() or None


def _unwritable(folder: Path) -> str | None:
    """Why images could not be saved in folder (which may not exist yet), or None when they can."""
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    existing = next(parent for parent in [folder, *folder.absolute().parents] if parent.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:  # a real write: os.access says yes to root even where nobody can write (/sys, a root-squashed NFS)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or err})"
    return None


def on_spaces(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Hugging Face Space (the Spaces runtime sets SPACE_ID=owner/name)."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("SPACE_ID"))


def environment_defaults(environ: Mapping[str, str]) -> dict:
    """Flag defaults taken from the environment: WEBUI_* variables, then the platform's own."""
    defaults: dict = {}  # the address (GRADIO_SERVER_NAME, a Space's 0.0.0.0) is chosen after the flags are read
    port = environ.get("GRADIO_SERVER_PORT")
    if port:
        try:
            defaults["port"] = int(port)
        except ValueError:  # Gradio reads it too, and fails on it later: said now, before any model loads
            raise ValueError(f"GRADIO_SERVER_PORT={port[:50]!r} is not a port number; set a number such as 7860, "
                             "or unset it") from None
    if on_spaces(environ):
        storage = spaces_outdir()
        if storage is not None:
            defaults["outdir"] = storage
    for name, dest in ENV_OVERRIDES.items():
        value = environ.get(name, "").strip()
        if value:
            defaults[dest] = Path(value).expanduser() if dest in ("models_dir", "outdir") else value
    return defaults


def spaces_outdir(data_dir: Path = SPACES_DATA_DIR) -> Path | None:
    """data_dir/outputs when the Space has persistent storage we can write to, else None (repo outputs/)."""
    if data_dir.is_dir() and os.access(data_dir, os.W_OK):
        return data_dir / "outputs"
    return None


def _credentials(parser: argparse.ArgumentParser, text: str | None, flag: str, env_name: str,
                 env_defaults: dict) -> list[tuple[str, str]]:
    try:
        return parse_credentials(text)
    except ValueError as err:
        if text is not None and text == env_defaults.get(flag.lstrip("-").replace("-", "_")):
            # Never echo a secret from the environment into the logs.
            parser.error(f"{env_name} must look like user:password[,user2:password2]")
        parser.error(str(err))
