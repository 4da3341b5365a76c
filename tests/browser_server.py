"""Start `python app.py` on a free port for the browser tests, and stop it again.

A real subprocess, so the tests cover the same start-up path a user runs, printed address included.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = re.compile(r"Running on local URL: (http://\S+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    def __init__(self, args: list[str], log_path: Path, timeout: float = 180.0):
        self.log_path = log_path
        started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "app.py", "--port", str(free_port()), *args], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._address = threading.Event()
        self.url: str | None = None
        threading.Thread(target=self._read_output, daemon=True).start()
        if not self._address.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"app.py printed no address; see {log_path}")
        self._wait_for_page(timeout)
        self.startup_seconds = time.monotonic() - started  # reported, never asserted on

    def _read_output(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                match = ADDRESS.search(line)
                if match and self.url is None:
                    self.url = match.group(1)
                    self._address.set()
        self._address.set()  # the process ended: stop waiting

    def _wait_for_page(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.url} never answered 200; see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
