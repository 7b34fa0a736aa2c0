"""Where measured unit times are kept between plans: one JSON file of seconds per key.

The planner (:mod:`.cost`) looks a unit kind's time up here before timing it, and writes what
it timed, so planning the same model again costs nothing.  The file is chosen by the caller
(``make_plan(..., profile_cache=...)``), else it is the process's default: the CLI sets that
from ``$PIPESERVE_PROFILE_CACHE`` (:data:`PROFILE_CACHE_ENV`) at start
(:func:`set_default_profile_cache`); otherwise ``~/.cache/pipeserve/unit-profiles.json``.
Library code never reads the environment.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

__all__ = [
    "PROFILE_CACHE_ENV",
    "ProfileCache",
    "default_profile_cache",
    "set_default_profile_cache",
]

PROFILE_CACHE_ENV = "PIPESERVE_PROFILE_CACHE"
"""The environment variable the CLI and the servers read the cache's path from."""

_lock = threading.Lock()
_default: Path | None = None


def set_default_profile_cache(path: str | Path | None) -> None:
    """The file every :class:`ProfileCache` without a path of its own uses in this process
    (None: ``~/.cache/pipeserve/unit-profiles.json``).  The CLI calls it once at start with
    ``$PIPESERVE_PROFILE_CACHE``, so the planner, a worker's profiling and ``run`` share it."""
    global _default
    _default = Path(path) if path else None


def default_profile_cache() -> Path:
    return _default or Path.home() / ".cache" / "pipeserve" / "unit-profiles.json"


class ProfileCache:
    """Seconds per key in the JSON file ``path`` (None: :func:`default_profile_cache`).

    A missing or corrupt file reads as empty; a file that cannot be written (a read-only home)
    is left alone, and the times are measured again next time."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_profile_cache()

    def get(self, key: str) -> float | None:
        try:
            entry = json.loads(self.path.read_text()).get(key)
        except (OSError, ValueError):
            return None
        return float(entry["seconds"]) if isinstance(entry, dict) and "seconds" in entry else None

    def put(self, key: str, seconds: float, what: str) -> None:
        path = self.path
        with _lock:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            data[key] = {"seconds": seconds, "what": what, "when": time.strftime("%Y-%m-%d %H:%M")}
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                tmp.replace(path)
            except OSError:
                pass  # a read-only home: profile again next time
