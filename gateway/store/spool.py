"""A durable local spool: one file per batch, in this replica's data directory.

A batch is written to `<name>.tmp`, fsynced, renamed into place and the directory fsynced, so a file
with the final name is always complete; a crash mid-write leaves only a `.tmp` file, removed at the next
start. Names sort by creation time, so batches are replayed oldest first. Every method blocks (file
I/O): callers run them in a thread.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

SUFFIX = ".batch"
_STALE_TMP_S = 60.0  # a .tmp this old belongs to a process that died while writing it


class SpoolFull(Exception):
    pass


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._sequence = itertools.count()
        self._bytes: int | None = None  # known after the first scan

    def _ensure(self) -> None:
        if self._bytes is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._bytes = sum(p.stat().st_size for p in self.directory.glob("*" + SUFFIX))

    def write(self, payload: bytes) -> Path:
        """Make one batch durable; raises OSError (disk) or SpoolFull."""
        self._ensure()
        assert self._bytes is not None
        if self._bytes + len(payload) > self.max_bytes:
            raise SpoolFull(f"spool {self.directory} holds {self._bytes} bytes, its limit is {self.max_bytes}")
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):08d}"
        tmp = self.directory / (name + ".tmp")
        final = self.directory / (name + SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        self._sync_directory()
        self._bytes += len(payload)
        return final

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable only once the directory is
        finally:
            os.close(fd)

    def pending(self) -> list[Path]:
        """The complete batches waiting, oldest first; stale partial files are removed."""
        self._ensure()
        now = time.time()
        for tmp in self.directory.glob("*.tmp"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_S:
                    tmp.unlink()
            except FileNotFoundError:
                pass
        return sorted(self.directory.glob("*" + SUFFIX))

    def read(self, path: Path) -> bytes | None:
        """None: gone (another process sharing the directory replayed it)."""
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        if self._bytes is not None:
            self._bytes = max(0, self._bytes - size)

    def reject(self, path: Path) -> Path:
        """Move a batch the database refuses for its content (not for being down) out of the way."""
        rejected = self.directory / "rejected"
        rejected.mkdir(exist_ok=True)
        target = rejected / path.name
        size = path.stat().st_size
        os.replace(path, target)
        if self._bytes is not None:
            self._bytes = max(0, self._bytes - size)
        return target

    @property
    def bytes(self) -> int:
        return self._bytes or 0
