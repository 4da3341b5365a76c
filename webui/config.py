"""Settings: parsed once in app.py from command-line flags, then passed down.

Flag names follow stable-diffusion-webui where one exists, so users' launch scripts keep working.
Nothing here is a module-level mutable global: every service receives the Settings it needs.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = PROJECT_ROOT / "models"
DEFAULT_OUTPUTS_DIR = PROJECT_ROOT / "outputs"
DEFAULT_MODEL_NAME = "sd-emoji-tiny"
DEVICES = ("auto", "cuda", "mps", "cpu")


@dataclass
class Settings:
    listen: bool = False
    port: int = 7860
    share: bool = False
    api: bool = False
    nowebui: bool = False
    gradio_auth: list[tuple[str, str]] = field(default_factory=list)
    api_auth: list[tuple[str, str]] = field(default_factory=list)
    models_dir: Path = DEFAULT_MODELS_DIR
    outdir: Path = DEFAULT_OUTPUTS_DIR
    ckpt: str = DEFAULT_MODEL_NAME
    device: str = "auto"
    no_half: bool = False
    no_half_vae: bool = False
    medvram: bool = False
    lowvram: bool = False
    xformers: bool = False
    no_safety_checker: bool = False
    offline: bool = False
    compile: bool = False
    queue_size: int = 64
    preview_every: int = 5

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen else "127.0.0.1"

    @property
    def api_enabled(self) -> bool:
        return self.api or self.nowebui


def parse_credentials(text: str | None) -> list[tuple[str, str]]:
    """'user:pass,user2:pass2' -> [("user", "pass"), ("user2", "pass2")]."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"credentials must look like user:password[,user2:password2], got {item!r}")
        pairs.append((user, password))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="app.py",
        description="diffusers-webui: a Stable Diffusion web UI and A1111-compatible API on diffusers.",
    )
    net = p.add_argument_group("network")
    net.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 instead of 127.0.0.1")
    net.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    net.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    net.add_argument("--api", action="store_true", help="also serve the A1111-compatible REST API under /sdapi/v1")
    net.add_argument("--nowebui", action="store_true", help="serve only the REST API, no web UI")
    net.add_argument("--gradio-auth", metavar="USER:PASS[,...]", help="put a login page in front of the web UI")
    net.add_argument("--api-auth", metavar="USER:PASS[,...]", help="protect every API route with HTTP Basic auth")

    files = p.add_argument_group("models and files")
    files.add_argument("--ckpt-dir", "--models-dir", dest="models_dir", type=Path, default=DEFAULT_MODELS_DIR,
                       help="folder scanned for models (diffusers folders, .safetensors, .ckpt)")
    files.add_argument("--outdir", type=Path, default=DEFAULT_OUTPUTS_DIR,
                       help="where images and the history database are written")
    files.add_argument("--ckpt", default=DEFAULT_MODEL_NAME,
                       help="model to load at start: a name in the models folder, a path, or a hub id "
                            f"(default: the embedded {DEFAULT_MODEL_NAME})")
    files.add_argument("--offline", action="store_true", help="never contact the model hub")

    dev = p.add_argument_group("device, precision and memory")
    dev.add_argument("--device", choices=DEVICES, default="auto", help="where to run the model (default auto)")
    dev.add_argument("--no-half", action="store_true", help="run the whole model in fp32 (slower, more memory)")
    dev.add_argument("--no-half-vae", action="store_true", help="decode the VAE in fp32 (avoids black images)")
    dev.add_argument("--medvram", action="store_true", help="keep only the running model part on the GPU")
    dev.add_argument("--lowvram", action="store_true", help="move layers to the GPU one at a time (slowest)")
    dev.add_argument("--xformers", action="store_true", help="use xformers attention when installed")
    dev.add_argument("--compile", action="store_true", help="compile the UNet and VAE (slow first start)")
    dev.add_argument("--no-safety-checker", action="store_true", help="do not load or run the safety checker")

    q = p.add_argument_group("queue")
    q.add_argument("--queue-size", type=int, default=64, help="most jobs waiting at once (default 64)")
    q.add_argument("--preview-every", type=int, default=5,
                   help="show a live preview every N denoising steps; 0 turns previews off (default 5)")
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        gradio_auth = parse_credentials(args.gradio_auth)
        api_auth = parse_credentials(args.api_auth)
    except ValueError as err:
        parser.error(str(err))
    if args.queue_size < 1:
        parser.error("--queue-size must be at least 1")
    values = vars(args) | {"gradio_auth": gradio_auth, "api_auth": api_auth}
    return Settings(**values)
