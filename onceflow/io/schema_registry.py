"""Records in a schema registry's wire format, and the registry client that
fetches their writer schemas.

The wire format (Confluent's, which other registries serve too): one magic byte
``0``, the writer schema's ID as 4 bytes big-endian, then the payload (an Avro
datum in the schema's binary encoding, or JSON text for a JSON Schema).

The client speaks the Confluent-compatible REST API: ``GET {url}/schemas/ids/{id}``
gives ``{"schema": "...", "schemaType": "AVRO"|"JSON"|...}`` (no ``schemaType``
means Avro), and a 404 with error code 40403 means no schema has that ID (any other
404 says the URL is not a registry's: a setup error, not a bad record). It is created lazily, once
per process and registry (:func:`registry_client`), and caches every schema it
fetched: a schema ID never changes its schema. What the event contract holds is
only :class:`RegistryConfig`, which pickles; a worker builds its own client.

A registry that cannot be reached, or answers with anything but the schema or a
404, is not a bad record: :class:`RegistryUnavailable` is raised after a few
retries with backoff, the bundle fails and the runner retries it or the job
fails loudly. A good record is never dead-lettered for it.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

MAGIC_BYTE = 0
HEADER_SIZE = 5

# Client settings: the names Confluent's clients use (also accepted with a
# ``schema.registry.`` prefix, as they are written in a Kafka properties file).
SETTING_USER_INFO = "basic.auth.user.info"
SETTING_CREDENTIALS_SOURCE = "basic.auth.credentials.source"
SETTING_TIMEOUT = "request.timeout.ms"
SETTING_RETRIES = "max.retries"
KNOWN_SETTINGS = (SETTING_USER_INFO, SETTING_CREDENTIALS_SOURCE, SETTING_TIMEOUT, SETTING_RETRIES)
FILE_PREFIX = "schema.registry."
# Registry settings a Kafka client properties file may hold without the prefix (as
# Confluent Cloud's do): taken for the registry, never passed to librdkafka.
_BARE_IN_KAFKA_FILES = (SETTING_USER_INFO, SETTING_CREDENTIALS_SOURCE)
UNKNOWN_ID_TTL_S = 30.0
SCHEMA_NOT_FOUND = 40403  # the error_code of a 404 that means "no schema with this ID"


class RegistryUnavailable(RuntimeError):
    """The registry could not answer (unreachable, 5xx, refused credentials):
    transient or a setup error, never a verdict on a record."""


class UnknownSchema(LookupError):
    """The registry has no schema with this ID (it answered 404)."""


class WireHeader(NamedTuple):
    schema_id: int
    payload: memoryview


class BadWireFormat(ValueError):
    pass


def split_wire_format(raw: bytes) -> WireHeader:
    """The schema ID and payload of a registry-framed record, or BadWireFormat."""
    if len(raw) < HEADER_SIZE:
        raise BadWireFormat(f"{len(raw)} bytes is shorter than the 5-byte registry header")
    if raw[0] != MAGIC_BYTE:
        raise BadWireFormat(f"magic byte is {raw[0]}, not 0: not in the schema registry's wire format")
    return WireHeader(int.from_bytes(raw[1:HEADER_SIZE], "big"), memoryview(raw)[HEADER_SIZE:])


def frame(schema_id: int, payload: bytes) -> bytes:
    """A payload in the wire format, written with ``schema_id``."""
    if not 0 <= schema_id < 2**32:
        raise ValueError("a schema ID is 4 bytes, unsigned")
    return bytes([MAGIC_BYTE]) + schema_id.to_bytes(4, "big") + payload


@dataclasses.dataclass(frozen=True)
class RegistryConfig:
    """Where the registry is and how to call it. Picklable; its repr shows no
    credentials."""

    url: str
    settings: Tuple[Tuple[str, str], ...] = dataclasses.field(default=(), repr=False)

    def __post_init__(self) -> None:
        url = self.url.strip().rstrip("/")
        if "@" in urllib.parse.urlsplit(url if "://" in url else f"//{url}").netloc:  # not shown: it holds a secret
            raise ValueError("the URL holds credentials: give them as the setting basic.auth.user.info=USER:PASSWORD "
                             "(--schema_registry_setting, or the properties file), and the URL without them")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{self.url!r} is not an http:// or https:// URL")
        object.__setattr__(self, "url", url)
        for name, value in self.settings:
            if name not in KNOWN_SETTINGS:
                raise ValueError(f"unknown schema registry setting {name!r}; known: {', '.join(KNOWN_SETTINGS)}")
            if name == SETTING_CREDENTIALS_SOURCE and value.strip().upper() != "USER_INFO":
                raise ValueError(f"{SETTING_CREDENTIALS_SOURCE}: only USER_INFO is supported (the credentials of "
                                 f"{SETTING_USER_INFO}=USER:PASSWORD)")

    def setting(self, name: str, default: Optional[str] = None) -> Optional[str]:
        return dict(self.settings).get(name, default)


def registry_settings(pairs, kafka_file_settings: Mapping[str, str]) -> Tuple[Tuple[str, str], ...]:
    """Settings from a Kafka properties file (``schema.registry.NAME=...`` or
    ``basic.auth.user.info=...`` lines) and then ``NAME=VALUE`` flags, which win.
    ValueError names the setting, never its value."""
    settings: Dict[str, str] = {}
    for name, value in kafka_file_settings.items():
        bare = name[len(FILE_PREFIX):] if name.startswith(FILE_PREFIX) else name
        if bare in KNOWN_SETTINGS and (name.startswith(FILE_PREFIX) or bare in _BARE_IN_KAFKA_FILES):
            settings[bare] = value
    for pair in pairs or ():
        name, sep, value = str(pair).partition("=")
        name = name.strip()
        if name.startswith(FILE_PREFIX):
            name = name[len(FILE_PREFIX):]
        if not sep or not name:  # the text may be a secret given without its name: not shown
            raise ValueError("--schema_registry_setting: a setting has no " + ("'='" if not sep else "name before '='")
                             + ": write NAME=VALUE, e.g. basic.auth.user.info=USER:PASSWORD")
        if name not in KNOWN_SETTINGS:
            # Shown only when it reads as a setting's name: USER:PASSWORD= is not one.
            shown = repr(name) if re.fullmatch(r"[a-z][a-z0-9._-]*", name) else "(not shown: it may be a secret)"
            raise ValueError(f"--schema_registry_setting: unknown setting {shown}; known: {', '.join(KNOWN_SETTINGS)}")
        settings[name] = value.strip()
    return tuple(sorted(settings.items()))


def kafka_settings_without_registry(settings: Mapping[str, str]) -> Dict[str, str]:
    """Kafka client settings less the registry's (librdkafka refuses names it does
    not know)."""
    return {name: value for name, value in settings.items()
            if not name.startswith(FILE_PREFIX) and name not in _BARE_IN_KAFKA_FILES}


class RegisteredSchema(NamedTuple):
    schema_type: str  # AVRO, JSON, PROTOBUF
    text: str


class RegistryClient:
    """Fetches schemas by ID over HTTP and caches them (thread-safe)."""

    def __init__(self, config: RegistryConfig, attempts: Optional[int] = None, backoff_s: float = 0.5):
        self._config = config
        self._cache: Dict[int, RegisteredSchema] = {}
        self._parsed: Dict[Tuple[str, int], Any] = {}
        self._registered: Dict[Tuple[str, str, str], int] = {}
        self._missing: Dict[int, float] = {}  # schema ID -> when the registry last answered 404
        # (kind, schema ID) -> when its text could not be parsed, and the error: asked again after UNKNOWN_ID_TTL_S
        self._unusable: Dict[Tuple[str, int], Tuple[float, Exception]] = {}
        self._lock = threading.Lock()
        retries = config.setting(SETTING_RETRIES)
        self._attempts = attempts if attempts is not None else (int(retries) + 1 if retries else 5)
        self._backoff_s = backoff_s
        self._timeout_s = int(config.setting(SETTING_TIMEOUT) or "10000") / 1000
        self._headers = {"Accept": "application/vnd.schemaregistry.v1+json, application/json"}
        user_info = config.setting(SETTING_USER_INFO)
        if user_info:
            token = base64.b64encode(user_info.encode("utf-8")).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self.fetches = 0  # HTTP requests made, for tests and metrics

    def schema(self, schema_id: int) -> RegisteredSchema:
        """The schema with this ID; UnknownSchema (404) or RegistryUnavailable.

        A 404 is remembered for :data:`UNKNOWN_ID_TTL_S` seconds, so that a stream
        of records with an unknown ID costs one request per ID and interval, not
        one per record; an ID registered later is found after that."""
        found = self._cache.get(schema_id)
        if found is not None:
            return found
        missing_since = self._missing.get(schema_id)
        if missing_since is not None and time.monotonic() - missing_since < UNKNOWN_ID_TTL_S:
            raise UnknownSchema(f"the schema registry has no schema with ID {schema_id}")
        try:
            fetched = self._fetch(schema_id)
        except UnknownSchema:
            with self._lock:
                self._missing[schema_id] = time.monotonic()
            raise
        with self._lock:
            self._cache[schema_id] = fetched
        return fetched

    def parsed(self, kind: str, schema_id: int, parse) -> Any:
        """``parse(schema text)`` of this ID, cached per ``kind`` (e.g. the parsed
        Avro schema). When ``parse`` raises, its error is raised again for
        :data:`UNKNOWN_ID_TTL_S` seconds, then the schema is fetched again: a reply
        that was not the registry's (a proxy's page answered with 200) stayed cached,
        and every record of that ID was refused for as long as the job ran."""
        key = (kind, schema_id)
        found = self._parsed.get(key)
        if found is not None:
            return found
        failed = self._unusable.get(key)
        if failed is not None and time.monotonic() - failed[0] < UNKNOWN_ID_TTL_S:
            raise failed[1].with_traceback(None)
        try:
            found = parse(self.schema(schema_id))
        except (UnknownSchema, RegistryUnavailable):
            raise
        except Exception as error:
            with self._lock:
                self._unusable[key] = (time.monotonic(), error)
                self._cache.pop(schema_id, None)
            raise
        with self._lock:
            self._parsed[key] = found
            self._unusable.pop(key, None)
        return found

    def register(self, subject: str, schema_text: str, schema_type: str = "AVRO") -> int:
        """Registers a schema under ``subject`` (``POST /subjects/S/versions``; an
        identical schema gets its existing ID) and returns its ID, cached.
        RegistryUnavailable when the registry does not answer with an ID."""
        key = (subject, schema_type, schema_text)
        found = self._registered.get(key)
        if found is not None:
            return found
        body = {"schema": schema_text}
        if schema_type != "AVRO":
            body["schemaType"] = schema_type
        data = json.dumps(body).encode("utf-8")
        url = f"{self._config.url}/subjects/{urllib.parse.quote(subject, safe='')}/versions"
        last = "no attempt made"
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(min(self._backoff_s * 2 ** (attempt - 1), 10.0))
            headers = {**self._headers, "Content-Type": "application/vnd.schemaregistry.v1+json"}
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                    schema_id = int(json.loads(response.read().decode("utf-8"))["id"])
                with self._lock:
                    self._registered[key] = schema_id
                    self._cache.setdefault(schema_id, RegisteredSchema(schema_type, schema_text))
                return schema_id
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code} {error.reason}"
                if 400 <= error.code < 500 and error.code not in (408, 429):  # refused: retrying will not help
                    break
            except (urllib.error.URLError, OSError, ValueError, KeyError) as error:
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
        raise RegistryUnavailable(f"schema registry {self._config.url} did not register a schema under "
                                  f"{subject!r}: {last}")

    def _fetch(self, schema_id: int) -> RegisteredSchema:
        url = f"{self._config.url}/schemas/ids/{schema_id}"
        last = "no attempt made"
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(min(self._backoff_s * 2 ** (attempt - 1), 10.0))
            self.fetches += 1
            request = urllib.request.Request(url, headers=self._headers)
            try:
                with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                    body = json.loads(response.read().decode("utf-8"))
                if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
                    raise ValueError(f"the reply is not a schema: {str(body)[:60]}")
                return RegisteredSchema(str(body.get("schemaType") or "AVRO").upper(), body["schema"])
            except urllib.error.HTTPError as error:
                if error.code == 404 and _error_code(error) == SCHEMA_NOT_FOUND:
                    raise UnknownSchema(f"the schema registry has no schema with ID {schema_id}") from None
                last = f"HTTP {error.code} {error.reason}"
                if error.code == 404:  # a 404 without the registry's code: the URL is not a registry's
                    last += f" without error code {SCHEMA_NOT_FOUND}: is {self._config.url} the registry's URL?"
                    break
                if error.code in (401, 403):  # credentials: retrying will not help
                    break
            except (urllib.error.URLError, OSError, ValueError, KeyError, http.client.HTTPException) as error:
                # HTTPException: a reply that is not HTTP, a body cut off (BadStatusLine, IncompleteRead)
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
        raise RegistryUnavailable(f"schema registry {self._config.url} did not give schema {schema_id} "
                                  f"after {attempt + 1} attempt(s): {last}")


def _error_code(error: urllib.error.HTTPError) -> Optional[int]:
    """The ``error_code`` of a registry's JSON error body, if it has one."""
    try:
        code = json.loads(error.read().decode("utf-8")).get("error_code")
    except Exception:  # pylint: disable=broad-except - an HTML page, an empty body...
        return None
    return code if isinstance(code, int) else None


_CLIENTS: Dict[RegistryConfig, RegistryClient] = {}
_CLIENTS_LOCK = threading.Lock()


def registry_client(config: RegistryConfig) -> RegistryClient:
    """This process's client of ``config``'s registry, created on first use."""
    client = _CLIENTS.get(config)
    if client is None:
        with _CLIENTS_LOCK:
            client = _CLIENTS.setdefault(config, RegistryClient(config))
    return client
