"""What a ``--sink`` or ``--dlq`` value names, once parsed: one :class:`Target`.

A target is plain data: which registry entry handles it (``scheme``), where it is
and with which options. Parsing, preparing and writing live with the registries
(:mod:`onceflow.io.sinks`, :mod:`onceflow.io.dlq`). A target may carry secrets
(a password in a libpq URI, Kafka client settings, a schema registry's
credentials): :meth:`Target.describe` and ``repr`` never show them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from onceflow.io.urls import redact_url


@dataclasses.dataclass(frozen=True, repr=False)
class Target:
    """A parsed sink or dead-letter queue.

    ``scheme`` is the registry key: ``sqlite``, ``postgresql``, ``bigquery``,
    ``file``, ``kafka``, or ``jsonl`` for a dead-letter file path. ``location`` is
    a file path (sqlite, jsonl), a libpq URI without ``table`` (postgresql: may
    hold a password, print :meth:`describe`, never the field), ``PROJECT.DATASET``
    (bigquery), a directory (file) or the bootstrap servers (kafka, whose topic is
    ``table``). ``options`` are the URL's other choices (``format``, ``method``).
    """

    scheme: str
    location: str
    table: Optional[str] = None
    options: Tuple[Tuple[str, str], ...] = ()
    # Client settings (kafka: --kafka_setting); may hold secrets, never described.
    client_settings: Tuple[Tuple[str, str], ...] = ()
    # kafka ?format=avro_registry: the schema registry (a RegistryConfig) the
    # messages' Avro schema is registered with.
    registry: Optional[object] = None

    def option(self, name: str) -> Optional[str]:
        """The value of option ``name``; None when not given."""
        return dict(self.options).get(name)

    def describe(self) -> str:
        """For people and logs; passwords redacted, client settings left out."""
        if self.scheme == "jsonl":
            return self.location
        if self.scheme == "kafka":
            query = "&".join(f"{name}={value}" for name, value in self.options)
            return f"kafka://{self.location}/{self.table}" + (f"?{query}" if query else "")
        detail = f"table {self.table}" if self.table else ""
        extra = ", ".join(f"{name} {value}" for name, value in self.options)
        inside = "; ".join(part for part in (detail, extra) if part)
        return f"{self.scheme} {redact_url(self.location)}" + (f" ({inside})" if inside else "")

    def __repr__(self) -> str:
        return f"Target({self.describe()!r})"
