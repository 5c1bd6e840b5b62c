"""URL helpers shared by the ``--sink`` and ``--dlq`` parsers: strict query
parameters, PostgreSQL URLs, and what is safe to show: passwords redacted,
errors cut to one line."""

from __future__ import annotations

import urllib.parse
from typing import Dict, Optional, Tuple

POSTGRES_FORM = "postgresql://USER[:PASS]@HOST:PORT/DB?table=NAME"
# libpq parameters passed through to the connection (everything else is refused).
LIBPQ_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "target_session_attrs")


# Query parameter names whose values are never shown (libpq's password,
# sslpassword, passfile..., and anything named like a secret).
_SECRET_PARAMETER_WORDS = ("password", "pass", "pwd", "secret", "token", "key", "credential")


def _is_secret_parameter(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_PARAMETER_WORDS)


def redact_url(text: str) -> str:
    """``text`` with the password of a ``scheme://user:password@host`` URL, and the
    value of every query parameter named like a secret (``?password=``), as ``***``."""
    parts = urllib.parse.urlsplit(str(text))
    try:
        password = parts.password
    except ValueError:
        password = None
    if not parts.netloc:
        return str(text)
    if password is not None:
        user, _, host = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}")
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        parts = parts._replace(query="&".join(
            f"{name}=***" if _is_secret_parameter(name) else urllib.parse.urlencode({name: value})
            for name, value in pairs))
    return urllib.parse.urlunsplit(parts)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for one-line reports."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def query_params(url: str, allowed: Tuple[str, ...]) -> Dict[str, str]:
    """The URL's query as a dict; ValueError on an unknown or repeated parameter."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True)
    shown = without_query(url)  # any parameter's value may be a secret: none is shown
    for name, values in query.items():
        if name not in allowed:
            hint = ("; give a PostgreSQL password in USER:PASS@ or, better, in PGPASSWORD, "
                    "a PGPASSFILE or a PGSERVICEFILE" if _is_secret_parameter(name) else "")
            raise ValueError(f"{shown!r}: unknown parameter {name!r}; accepted: "
                             + ", ".join(f"?{a}=" for a in allowed) + hint)
        if len(values) != 1:
            raise ValueError(f"{shown!r}: parameter {name!r} is given {len(values)} times")
    return {name: values[0] for name, values in query.items()}


def without_query(url: str) -> str:
    """``url`` redacted and without its query (``?...`` shown as ``?...``)."""
    shown = redact_url(url)
    # Cut as text: urlunsplit writes sqlite:///x.db (no host) back as sqlite:/x.db.
    base = shown.split("#", 1)[0]
    return base.split("?", 1)[0] + ("?..." if "?" in base else "")


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
