"""Serve the web UI (and the REST API when asked) as Settings say, then keep the process alive.

`serve(services)` starts the server and returns at once (tests use it); `launch(services)` is what
app.py calls: serve, print the address, block until Ctrl+C, then stop the worker cleanly.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webui.services import Services
from webui.storage.outputs import OutputStore

log = logging.getLogger(__name__)
SESSIONS_KEPT = 1000  # Gradio's default, 10,000, is 2 GB of closed tabs on a public server


@dataclass
class Served:
    blocks: Any  # gr.Blocks
    app: Any  # the FastAPI app Gradio runs
    url: str  # where this machine reaches the UI
    share_url: str | None

    def close(self) -> None:
        from gradio.tunneling import CURRENT_TUNNELS

        self.blocks.close()
        for tunnel in CURRENT_TUNNELS:  # --share's tunnel process, which Gradio ends only in its block_thread
            tunnel.kill()


def url_host(host: str) -> str:
    """host as written in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def browser_address(host: str) -> str:
    """Where a browser on this machine reaches a server on host: a wildcard address by its loopback."""
    return url_host({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host))


def check_port_free(settings) -> None:
    """Fail at once when the port is taken, not after minutes of loading (or downloading) a model."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET  # --server-name may be IPv6
    with socket.socket(family) as probe:
        if os.name == "posix":  # as Gradio and uvicorn bind: a port left in TIME_WAIT is free (on Windows
            # the same option would let two servers share a port)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as err:
            raise _port_taken(settings, err) from None


def check_before_loading(settings) -> None:
    """Fail at once, before minutes of loading a model, on what would leave the server unable to serve or to make a
    picture: a taken port, an IPv6 address for the web UI (Gradio cannot serve one), a --device this machine lacks."""
    check_port_free(settings)
    if ":" in settings.host and not settings.nowebui:
        raise SystemExit(f"Cannot serve the web UI on the IPv6 address {settings.host}: Gradio serves IPv4 addresses "
                         "only. Use --server-name 0.0.0.0 (every interface) or 127.0.0.1, or --nowebui for the REST "
                         "API alone, which IPv6 serves.")
    from webui.engine.loader import ModelLoadError, pick_device

    try:
        pick_device(settings.device)
    except ModelLoadError as err:
        raise SystemExit(f"Cannot start: {err}.") from None


def _port_taken(settings, err: OSError) -> SystemExit:
    if isinstance(err, socket.gaierror):  # the name, not the port: it names no address of this machine
        return SystemExit(f"Cannot serve on {settings.host}:{settings.port}: {settings.host!r} is no address of "
                          f"this machine ({err}). Pass --server-name 0.0.0.0 (every network), 127.0.0.1, or one of "
                          "this machine's addresses.")
    return SystemExit(f"Cannot serve on {settings.host}:{settings.port} ({err}). "
                      "Is another server using that port? Pass --port N to pick another.")


def served_folders(outputs: OutputStore) -> list[Path]:
    """The image folders in outdir (never outdir itself: with --outdir ~ that would serve the home folder),
    created now so they can be named. Gradio follows links before it checks a path, so a folder linked
    to a bigger disk is named by its target. A link whose target is missing (a disk not mounted) is named by
    it all the same, so its images show once the disk is back; until then saving there fails with a warning."""
    folders = []
    for folder in outputs.image_folders():
        if folder.is_symlink() and not folder.exists():
            log.warning("%s links to %s, which does not exist: is that disk mounted? Images cannot be saved there "
                        "until it is; mount it, or remove the link to save in %s itself", folder, folder.resolve(),
                        outputs.outdir)
        else:
            folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder.resolve())
    return folders


def serve(services: Services) -> Served:
    """Start the Gradio server in the background; attach the REST API when --api is given."""
    import gradio as gr  # imported only when a UI is served

    from webui.ui.blocks import build_ui, launch_assets

    settings = services.settings
    if settings.api_enabled:
        from webui.api import attach_api  # the API's modules load only when it is asked for
    blocks = build_ui(services)
    folders = served_folders(services.outputs)
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
            app_kwargs={"lifespan": api_first} if settings.api_enabled else None,
            server_name=settings.host, server_port=settings.port, share=settings.share,
            auth=settings.gradio_auth or None, auth_message="diffusers-webui: please log in",
            prevent_thread_lock=True, quiet=True, ssr_mode=False, enable_monitoring=False,
            # Gradio keeps each page load's session (~200 KB here) after its tab closes, up to this many.
            state_session_capacity=SESSIONS_KEPT,
            show_error=True,  # an unexpected error shows its message in the page (never the traceback)
            # Only the image folders are served: not the history database, caches or anything else in outdir.
            allowed_paths=[str(f) for f in folders],
            **launch_assets(),
        )
    except OSError as err:
        blocks.close()
        raise _port_taken(settings, err) from None
    # --server-name 192.168.1.5 is not reached through 127.0.0.1: use the address served on, unless it is a wildcard.
    url = f"http://{browser_address(settings.host)}:{blocks.server_port}"
    return Served(blocks, app, url, share_url)


def describe(served: Served, services: Services) -> list[str]:
    """The lines printed at start-up: where to point a browser, and what went wrong with --share."""
    settings = services.settings
    port = served.blocks.server_port
    if settings.all_interfaces:
        lines = [f"Running on http://{url_host(settings.host)}:{port} "
                 f"(all network interfaces; on this machine: {served.url})"]
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


def hide_harmless_warnings() -> None:
    """transformers 5 warns at every start that the safety checker's image processor falls back to PIL
    because torchvision is missing. That fallback is what this project wants (torchvision is no dependency
    of it): the warning would only send users to install a package they do not need."""
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage())


def launch(services: Services) -> None:
    if services.settings.nowebui:
        _serve_api_only(services)
        return
    # Gradio checks its own server with httpx at start; at INFO each request would be a console line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    served = serve(services)
    for line in describe(served, services):
        print(line, flush=True)
    restore_signals = _stop_on_sigterm()
    try:
        _wait_until_stopped(served)
    finally:
        # The jobs first: a blocking /sdapi/v1/txt2img is then answered (with what its job made), and the
        # server's close, which waits for running requests, does not wait on a job that goes on.
        services.worker.stop()
        served.close()
        services.close()
        restore_signals()  # for callers that go on (tests)


def _wait_until_stopped(served: Served) -> None:
    """Gradio's block_thread, without its closing of the server on Ctrl+C: launch() closes it once the jobs
    are cancelled."""
    try:
        while served.blocks.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("Stopping: the running and queued jobs are cancelled.", flush=True)


def _stop_on_sigterm():
    """Docker, systemd and Spaces stop a process with SIGTERM: treat it as Ctrl+C, which ends
    _wait_until_stopped, so launch() stops the jobs and the server cleanly. Returns what puts the handlers
    before back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    handler = stop_then_exit_at_once()
    before = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(signum, previous) for signum, previous in before.items()]


def stop_then_exit_at_once():
    """A signal handler: the first Ctrl+C or SIGTERM stops cleanly (KeyboardInterrupt); a second one while
    that runs ends the process at once, with a line instead of a traceback. Nothing is lost that a crash
    would not lose: the next start removes unfinished files and marks the running job failed."""
    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            print("Stopped at once (asked twice); the running job, if any, is left unfinished.",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        stopping.set()
        raise KeyboardInterrupt

    return on_signal


def _serve_api_only(services: Services) -> None:
    import uvicorn

    settings = services.settings
    from webui.api import create_api_app

    app = create_api_app(services)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    server_exit = server.handle_exit

    def stop_jobs_then_exit(sig, frame) -> None:
        # uvicorn lets running requests finish before it stops, and a blocking /txt2img waits for its job:
        # cancel the jobs first (on another thread: this one runs the server's event loop).
        threading.Thread(target=services.worker.stop, name="stop-worker", daemon=True).start()
        server_exit(sig, frame)

    server.handle_exit = stop_jobs_then_exit
    try:
        print(f"Running the REST API only (--nowebui) on http://{url_host(settings.host)}:{settings.port}/sdapi/v1/",
              flush=True)
        print(settings.api_access(), flush=True)
        server.run()
    except KeyboardInterrupt:  # uvicorn raises Ctrl+C again once it has shut down, for Python's own handler
        print("Stopped.", flush=True)
    finally:
        services.close()
