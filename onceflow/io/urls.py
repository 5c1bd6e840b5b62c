"""URL helpers shared by the ``--sink`` and ``--dlq`` parsers: strict query
parameters, PostgreSQL URLs, and what is safe to show: passwords redacted,
errors cut to one line."""

from __future__ import annotations

import urllib.parse
from typing import Dict, Optional, Tuple

POSTGRES_FORM = "postgresql://USER[:PASS]@HOST:PORT/DB?table=NAME"
# libpq parameters passed through to the connection (everything else is refused).
LIBPQ_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "target_session_attrs")


def redact_url(text: str) -> str:
    """``text`` with the password of a ``scheme://user:password@host`` URL as ``***``."""
    parts = urllib.parse.urlsplit(str(text))
    try:
        password = parts.password
    except ValueError:
        password = None
    if not parts.netloc or password is None:
        return str(text)
    user, _, host = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}"))


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for one-line reports."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def query_params(url: str, allowed: Tuple[str, ...]) -> Dict[str, str]:
    """The URL's query as a dict; ValueError on an unknown or repeated parameter."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True)
    for name, values in query.items():
        if name not in allowed:
            raise ValueError(f"{redact_url(url)!r}: unknown parameter {name!r}; accepted: "
                             + ", ".join(f"?{a}=" for a in allowed))
        if len(values) != 1:
            raise ValueError(f"{redact_url(url)!r}: parameter {name!r} is given {len(values)} times")
    return {name: values[0] for name, values in query.items()}


def parse_postgres_url(url: str, default_table: Optional[str]) -> Tuple[str, Optional[str]]:
    """``postgresql://`` (or ``postgres://``) ``USER[:PASS]@HOST[:PORT]/DB?table=NAME``
    to (libpq URI without ``table``, table). The table name is returned unchecked."""
    shown = redact_url(url)
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"{shown!r} is not a PostgreSQL URL; write {POSTGRES_FORM}")
    query = query_params(url, ("table", *LIBPQ_PARAMETERS))
    table = query.pop("table", default_table)
    try:
        parsed.port  # pylint: disable=pointless-statement
    except ValueError:
        raise ValueError(f"{shown!r}: the port must be a number; write {POSTGRES_FORM}") from None
    if not parsed.hostname:
        raise ValueError(f"{shown!r} names no host; write {POSTGRES_FORM}")
    database = parsed.path.lstrip("/")
    if not database or "/" in database:
        raise ValueError(f"{shown!r} names no database; write {POSTGRES_FORM}")
    location = urllib.parse.urlunsplit(("postgresql", parsed.netloc, parsed.path, urllib.parse.urlencode(query), ""))
    return location, table
