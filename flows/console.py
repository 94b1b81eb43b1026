"""What a command-line user sees of Prefect's and Dask's console logs.

A ``dereverb`` command reports its outcome itself: a summary when it succeeds, one ``error:``
line when it fails. Prefect's console handler would also print every run's INFO lines and, for
a failure, the whole traceback (70-370 lines) before that one line. So, unless ``--debug``,
the console keeps warnings and drops INFO lines and records that carry a traceback. Everything
still reaches the Prefect server (the run's page and its logs), which has its own handler.

The filter is installed through Prefect's documented hook, a logging configuration file named
by ``PREFECT_LOGGING_SETTINGS_PATH``, so it also applies in the Dask worker processes a build
starts (they inherit the environment and configure Prefect's logging from that file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

import yaml

FILTER_NAME = "dereverb_console"
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# Lines that say nothing a user can act on: a failed run's final state (the command prints the
# error), and Prefect's event queue draining at exit.
NOISE = ("Finished in state", "Still processing items")


class ConsoleFilter(logging.Filter):
    """Pass warnings and errors that carry no traceback.

    Prefect's "View at" line is INFO and dropped too: a command's temporary server stops with
    it, so the link would not open afterwards; when the server outlives the command
    (``dereverb ui``, or the user's ``PREFECT_API_URL``), ``build`` prints the run's link itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            return False  # the command prints the error as one line; the server keeps the rest
        if record.levelno >= logging.ERROR and record.name.startswith(RUN_LOGGERS):
            return False  # a failed run (and the tasks cancelled with it): the command says so
        message = record.getMessage()
        if message.startswith(NOISE):
            return False
        return record.levelno >= logging.WARNING


def _prefect_default_config() -> dict:
    """Prefect's own logging configuration, read without importing Prefect (slow)."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("prefect")
    path = Path(next(iter(spec.submodule_search_locations))) / "logging" / "logging.yml"
    return yaml.safe_load(path.read_text())


def quiet_console_config() -> Path:
    """Write Prefect's logging configuration with the console filter added; return its path.

    Placeholders such as ``${PREFECT_LOGGING_LEVEL}`` are kept: Prefect fills them in when it
    loads the file, as it does for its own.
    """
    config = _prefect_default_config()
    config.setdefault("filters", {})[FILTER_NAME] = {"()": f"{__name__}.ConsoleFilter"}
    handler = config.get("handlers", {}).get("console")
    if handler is not None:
        handler["filters"] = [*handler.get("filters", []), FILTER_NAME]
    text = yaml.safe_dump(config, sort_keys=False)
    # One file per content (and user): written once, then reused by every later command.
    folder = Path(tempfile.gettempdir()) / f"dereverb-logging-{getattr(os, 'getuid', lambda: 0)()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"logging-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yml"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def quiet_console() -> None:
    """Install the console filter for this process and the processes it starts.

    Must run before Prefect is imported. A logging configuration the user chose
    (``PREFECT_LOGGING_SETTINGS_PATH``) is left alone.
    """
    if os.environ.get("PREFECT_LOGGING_SETTINGS_PATH"):
        return
    try:
        os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(quiet_console_config())
    except (OSError, ModuleNotFoundError, yaml.YAMLError):
        return  # the console is only noisier, never wrong
