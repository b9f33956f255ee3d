"""A throwaway PostgreSQL cluster for the tests: `initdb` in a temp dir, started with `pg_ctl` on a free
port, as the `postgres` OS user when we are root (PostgreSQL refuses to run as root), trust auth on
127.0.0.1 only. Stopped and deleted by `close()`.

`initdb` is looked for on PATH, then in Debian's /usr/lib/postgresql/<version>/bin (the package puts
its server binaries there, off PATH); `make postgres` installs it.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.processes import free_port

_names = itertools.count(1)


def bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


class PostgresCluster:
    def __init__(self) -> None:
        bindir = bin_dir()
        if bindir is None:
            raise FileNotFoundError("initdb not found (PATH, /usr/lib/postgresql/*/bin): run `make postgres`")
        self._bin = bindir
        self._root = Path(tempfile.mkdtemp(prefix="gw-pg-"))  # not pytest's tmp: 0700 under root's name
        self.datadir = self._root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self._root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-locale", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self._bin / tool), *args]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120, cwd=self._root)

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c fsync=off -c full_page_writes=off -c max_connections=200")
        done = self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self._root / "server.log"), "-o", options,
                         "-w", "-t", "60", "start", check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash: connections drop without a goodbye, as when the server dies."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self._root / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def url(self, database: str = "postgres") -> str:
        """libpq's form, as GATEWAY_DATABASE_URL takes it."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "gw") -> str:
        """A fresh, empty database; returns its URL."""
        name = f"{prefix}_{os.getpid()}_{next(_names)}"
        asyncio.run(self._execute(f'CREATE DATABASE "{name}"'))
        return self.url(name)

    async def _execute(self, sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres", database="postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self._root, ignore_errors=True)
