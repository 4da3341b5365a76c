"""Serve the web UI (and the REST API when asked) as Settings say, then keep the process alive.

`serve(services)` starts the server and returns at once (tests use it); `launch(services)` is what
app.py calls: serve, print the address, block until Ctrl+C, then stop the worker cleanly.
"""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from webui.services import Services

# Files in outdir that are not images: never served, although outdir is.
PRIVATE_FILES = ("cache", "history.sqlite3", "history.sqlite3-wal", "history.sqlite3-shm")


@dataclass
class Served:
    blocks: Any  # gr.Blocks
    app: Any  # the FastAPI app Gradio runs
    url: str  # where this machine reaches the UI
    share_url: str | None

    def close(self) -> None:
        self.blocks.close()


def api_function(name: str) -> Callable:
    """webui.api.<name>, imported only when the API is asked for, with a clear error if it is missing."""
    try:
        from webui import api
        return getattr(api, name)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"--api / --nowebui need webui.api.{name}(), which this install lacks: {err}") from None


def served_folders(outdir: Path) -> list[Path]:
    """outdir, and where its linked folders lead (outputs/txt2img-images linked to a bigger disk, say):
    Gradio follows links before it checks a path, so each target must be named too."""
    folders = [outdir]
    for child in [*outdir.glob("*"), *outdir.glob("*/*")]:
        if child.is_symlink() and child.is_dir():
            folders.append(child.resolve())
    return folders


def serve(services: Services) -> Served:
    """Start the Gradio server in the background; attach the REST API when --api is given."""
    import gradio as gr  # imported only when a UI is served

    from webui.ui.blocks import build_ui, launch_assets

    settings = services.settings
    attach_api = api_function("attach_api") if settings.api_enabled else None  # fail before binding a port
    blocks = build_ui(services)
    outdir = services.outputs.outdir.resolve()
    folders = served_folders(outdir)
    # Shown straight from outputs/ rather than copied into Gradio's cache: no second copy of every image
    # in /tmp, and an image deleted in History is gone for good.
    gr.set_static_paths(folders)

    @asynccontextmanager
    async def api_first(app):
        # Runs as the server starts, before it takes a request: the page never answers while /sdapi is a 404.
        attach_api(app, services)
        yield

    try:
        app, _, share_url = blocks.launch(
            app_kwargs={"lifespan": api_first} if attach_api is not None else None,
            server_name=settings.host, server_port=settings.port, share=settings.share,
            auth=settings.gradio_auth or None, auth_message="diffusers-webui: please log in",
            prevent_thread_lock=True, quiet=True, ssr_mode=False, enable_monitoring=False,
            show_error=True,  # an unexpected error shows its message in the page (never the traceback)
            # Images are shown from outdir; the history database and caches next to them are not served.
            allowed_paths=[str(f) for f in folders], blocked_paths=[str(outdir / name) for name in PRIVATE_FILES],
            **launch_assets(),
        )
    except OSError as err:
        blocks.close()
        raise SystemExit(f"Cannot serve on {settings.host}:{settings.port} ({err}). "
                         "Is another server using that port? Pass --port N to pick another.") from None
    url = f"http://127.0.0.1:{blocks.server_port}"
    return Served(blocks, app, url, share_url)


def describe(served: Served, services: Services) -> list[str]:
    """The lines printed at start-up: where to point a browser, and what went wrong with --share."""
    settings = services.settings
    port = served.blocks.server_port
    if settings.listen:
        lines = [f"Running on http://0.0.0.0:{port} (all network interfaces; on this machine: {served.url})"]
    else:
        lines = [f"Running on local URL: {served.url}"]
    if settings.api_enabled:
        lines.append(f"REST API: {served.url}/sdapi/v1/ (docs at {served.url}/docs)")
        lines.append(settings.api_access())
    if settings.share:
        lines.append(f"Running on public URL: {served.share_url}" if served.share_url else
                     "--share: could not get a public link from Gradio's share server (is this machine "
                     f"online?). The UI is still served at {served.url}.")
    return lines


def launch(services: Services) -> None:
    if services.settings.nowebui:
        _serve_api_only(services)
        return
    # Gradio checks its own server with httpx at start; at INFO each request would be a console line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    served = serve(services)
    for line in describe(served, services):
        print(line, flush=True)
    _stop_on_sigterm()
    try:
        served.blocks.block_thread()
    finally:
        services.close()


def _stop_on_sigterm() -> None:
    """Docker, systemd and Spaces stop a process with SIGTERM: treat it as Ctrl+C, which Gradio's
    block_thread() handles by closing the server, so the worker then stops cleanly too."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _serve_api_only(services: Services) -> None:
    import uvicorn

    settings = services.settings
    app = api_function("create_api_app")(services)
    print(f"Running the REST API only (--nowebui) on http://{settings.host}:{settings.port}/sdapi/v1/", flush=True)
    print(settings.api_access(), flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        services.close()
