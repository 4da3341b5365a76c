"""Start-up time: from `python app.py` to the first HTTP 200 on the page.

    python bench/startup.py                       # this checkout, 3 runs
    python bench/startup.py --baseline ../other   # also another checkout, runs interleaved, with the ratio
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_start(checkout: Path, extra: list[str], timeout: float = 180.0) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--outdir", outdir, *extra],
                                cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - started < timeout:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as reply:
                        if reply.status == 200:
                            return time.perf_counter() - started
                except OSError:
                    time.sleep(0.05)
            raise RuntimeError(f"{checkout} did not answer within {timeout} s")
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout to time the same way, interleaved")
    parser.add_argument("app_args", nargs="*", help="extra flags for app.py (after --)")
    args = parser.parse_args()
    checkouts = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    times: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(args.runs):
        for name, checkout in checkouts.items():
            times[name].append(time_start(checkout, args.app_args))
    for name, values in times.items():
        print(f"{name:8s} median {statistics.median(values):6.2f} s  runs: {', '.join(f'{v:.2f}' for v in values)}")
    if args.baseline:
        ratio = statistics.median(times["this"]) / statistics.median(times["baseline"])
        print(f"ratio this/baseline: {ratio:.3f}")


if __name__ == "__main__":
    main()
