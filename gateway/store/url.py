"""`GATEWAY_DATABASE_URL` as libpq writes it, turned into SQLAlchemy's async URL.

Accepted: `postgresql://user[:password]@host[:port]/db[?sslmode=...]` (also `postgres://`, and the
SQLAlchemy spellings `postgresql+asyncpg://`), `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`.
Unset: an SQLite file `gateway.db` in the data directory. A malformed value raises `DatabaseUrlError`,
whose message names the variable and shows the URL with its password replaced by `***`.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from sqlalchemy.engine import URL

from gateway.errors import ConfigError

VARIABLE = "GATEWAY_DATABASE_URL"
SQLITE_FILE = "gateway.db"
# libpq parameters asyncpg understands, and the name asyncpg gives them.
_PG_PARAMS = {"sslmode": "ssl", "connect_timeout": "timeout", "application_name": "application_name"}
_SSL_MODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


class DatabaseUrlError(ConfigError):
    what = "database URL"


def redact(raw: str) -> str:
    """The URL with any password (userinfo or `password=` parameter) replaced by `***`. Everything before
    the last '@' counts as userinfo, so a password with unencoded '/', '?' or '@' is hidden too."""
    scheme, sep, rest = raw.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{host}"
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", f"{scheme}{sep}{rest}")


def _bad(raw: str, problem: str) -> DatabaseUrlError:
    return DatabaseUrlError([f"{VARIABLE}: {problem} (got {redact(raw)!r}); expected "
                             "postgresql://user:password@host:port/database or sqlite:///path/to/file.db"])


def sqlalchemy_url(raw: str | None, data_dir: Path) -> URL:
    """The async SQLAlchemy URL for `raw` (the variable's value, None when unset)."""
    if raw is None or not raw.strip():
        return URL.create("sqlite+aiosqlite", database=str(data_dir / SQLITE_FILE))
    raw = raw.strip()
    scheme = raw.partition("://")[0].lower() if "://" in raw else ""
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return _postgres(raw)
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return _sqlite(raw)
    raise _bad(raw, "unknown scheme " + (repr(scheme) if scheme else "(none)"))


def _postgres(raw: str) -> URL:
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise _bad(raw, f"not a valid URL ({_reason(exc)})") from None
    if parts.fragment:
        raise _bad(raw, "a '#' in the URL (percent-encode it as %23 in a password)")
    if not parts.hostname:
        raise _bad(raw, "no host")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise _bad(raw, "no database name after the host" if not database else "a database name with '/'")
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _PG_PARAMS:
            raise _bad(raw, f"unsupported parameter {name!r} (supported: {', '.join(sorted(_PG_PARAMS))})")
        if name == "sslmode" and value not in _SSL_MODES:
            raise _bad(raw, f"sslmode must be one of {', '.join(sorted(_SSL_MODES))}")
        if name == "connect_timeout" and not value.isdigit():
            raise _bad(raw, "connect_timeout must be a whole number of seconds")
        query[_PG_PARAMS[name]] = value
    return URL.create("postgresql+asyncpg", username=unquote(parts.username) if parts.username else None,
                      password=unquote(parts.password) if parts.password is not None else None,
                      host=parts.hostname, port=port, database=database, query=query)


def _sqlite(raw: str) -> URL:
    rest = raw.partition("://")[2]
    if not rest.startswith("/") or rest == "/":
        raise _bad(raw, "an SQLite URL needs a file path: sqlite:///relative.db or sqlite:////absolute.db")
    path = rest[1:].split("?", 1)[0]
    if path in ("", ":memory:"):
        raise _bad(raw, "an in-memory SQLite database would lose the ledger at exit; give a file path")
    return URL.create("sqlite+aiosqlite", database=unquote(path))


def _reason(exc: Exception) -> str:
    # urllib's messages may quote the netloc; keep only its wording, never the value.
    text = str(exc)
    hint = "; percent-encode characters such as / @ ? # : in the password"
    return ("port must be a number from 0 to 65535" if "port" in text.lower() else "cannot be parsed") + hint


def describe(url: URL) -> str:
    """For logs and `gateway db status`: the URL without its password."""
    return url.render_as_string(hide_password=True)
