"""Entry point: parse flags into Settings, build the services, launch. No logic lives here."""
from __future__ import annotations

import logging
import os
import sys

from webui.config import parse_settings


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)  # first, so --help answers before torch and gradio load
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from webui.launch import check_before_loading, hide_harmless_warnings, launch
    from webui.services import build_services

    hide_harmless_warnings()
    check_before_loading(settings)
    try:
        services = build_services(settings)
    except KeyboardInterrupt:  # Ctrl+C while the model loads (a long first download): a word, not a traceback
        print("Stopped while starting.", file=sys.stderr, flush=True)
        # Now: a plain exit would wait for the download's threads to fetch every file. The history and the
        # outputs folder were let go of already.
        os._exit(130)
    launch(services)


if __name__ == "__main__":
    main(sys.argv[1:])
