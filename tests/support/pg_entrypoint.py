"""Stand-in for the postgres image's docker-entrypoint.sh, for the rendered PostgreSQL container run as
a local process: on first start (empty PGDATA) create the cluster as the image does (initdb with
POSTGRES_USER and POSTGRES_PASSWORD, the POSTGRES_DB database, password logins over TCP), then exec
`postgres` with the container's own arguments. A restart with a PGDATA already there only execs.

    python tests/support/pg_entrypoint.py postgres -c name=value ...
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found (PostgreSQL's server binaries)")
    return found


def main() -> None:
    args = sys.argv[1:]
    assert args and args[0] == "postgres", "the image runs `docker-entrypoint.sh postgres ...`"
    data = Path(os.environ["PGDATA"])
    user, db = os.environ.get("POSTGRES_USER", "postgres"), os.environ.get("POSTGRES_DB")
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", delete=False) as pw:
            pw.write(os.environ["POSTGRES_PASSWORD"])
        try:
            subprocess.run([_bin("initdb"), "-D", str(data), "-U", user, f"--pwfile={pw.name}",
                            "--auth-local=trust", "--auth-host=scram-sha-256", "--data-checksums"],
                           check=True, stdout=subprocess.DEVNULL)
        finally:
            os.unlink(pw.name)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all all scram-sha-256\n")
        if db and db != "postgres":  # as the image: POSTGRES_DB is created unless it is the default one
            subprocess.run([_bin("postgres"), "--single", "-D", str(data), "postgres"], check=True,
                           input=f'CREATE DATABASE "{db}";\n', text=True, stdout=subprocess.DEVNULL)
    os.execv(_bin("postgres"), [_bin("postgres"), "-D", str(data), *args[1:]])


if __name__ == "__main__":
    main()
