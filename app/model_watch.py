"""The model-file watcher of gunicorn's master (MODEL_WATCH_S > 0): a replaced bundle file is reloaded by itself.

Compose's `train` service and Kubernetes' `kubectl cp` write the bundle into a volume the api mounts read-only, from
outside its container: no one is there to send the HUP that docs/operations.md's hot-swap ends with. The master
polls each MODEL_PATH's (inode, size, mtime); once a change has held still for a whole interval (a copy still in
progress keeps changing), it sends itself SIGHUP, the documented reload: the running workers serve until the new
generation is warm, and a bad new file leaves them serving with the reason in the log. Imports no torch.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

Signature = tuple[tuple[int, int, int] | None, ...]


def signature(paths: Sequence[str]) -> Signature:
    """Per path (inode, size, mtime in ns), or None where there is no file now."""
    found = []
    for path in paths:
        try:
            stat = os.stat(path)
            found.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except OSError:
            found.append(None)
    return tuple(found)


class ModelWatch:
    """Polls `paths` every `interval` seconds and calls `reload(reason)` once a change has held still one interval."""

    def __init__(self, paths: Sequence[str], interval: float, reload: Callable[[str], None]):
        self.paths, self.interval, self._reload = tuple(paths), interval, reload
        self._served = signature(self.paths)  # what the running workers loaded

    def start(self) -> None:
        """Poll in a daemon thread for the master's lifetime (it outlives reloads: gunicorn runs when_ready once)."""
        threading.Thread(target=self._run, name="model-watch", daemon=True).start()

    def poll(self, seen: Signature) -> Signature:
        """One step: `seen` is the signature of the previous poll; reloads when it differs from what is served and
        equals the current one (the change held still). Returns the current signature."""
        now = signature(self.paths)
        if now != self._served and now == seen and None not in now:
            changed = [path for path, old, new in zip(self.paths, self._served, now, strict=True) if old != new]
            self._served = now
            self._reload(f"{', '.join(changed)} replaced")
        return now

    def _run(self) -> None:
        seen = self._served
        while True:
            time.sleep(self.interval)
            seen = self.poll(seen)


def hup_self(log: Callable[[str], None]) -> Callable[[str], None]:
    """A `reload` for ModelWatch in gunicorn's master: log the reason, then SIGHUP this process (gunicorn's reload)."""

    def reload(reason: str) -> None:
        log(f"model watch: {reason}; reloading (SIGHUP)")
        os.kill(os.getpid(), signal.SIGHUP)

    return reload
