"""A schema registry STAND-IN for tests: a tiny HTTP server with the two calls of
the Confluent-compatible REST API that the tests need, and nothing else.

    POST /subjects/{subject}/versions   {"schema": "...", "schemaType": "AVRO"|"JSON"} -> {"id": N}
    GET  /schemas/ids/{id}              -> {"schema": "...", "schemaType": ...}, or 404 (error_code 40403)

It is not a schema registry (no compatibility rules, no subjects listing, no
persistence). No real registry could be run here (see README: reading
registry-framed records); onceflow's HTTP client is tested against this server.
``down`` makes every call answer 503, ``user_info`` requires HTTP basic auth.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Tuple


class RegistryStandIn:
    def __init__(self, user_info: Optional[str] = None, first_id: int = 1):
        self.schemas: Dict[int, Tuple[str, str]] = {}
        self.requests = []  # (method, path, authorization header)
        self.down = False
        self.user_info = user_info
        self._next_id = first_id
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _allowed(self):
                standin.requests.append((self.command, self.path, self.headers.get("Authorization")))
                if standin.down:
                    self._reply(503, {"error_code": 50003, "message": "stand-in is down"})
                    return False
                if standin.user_info is not None:
                    expected = "Basic " + base64.b64encode(standin.user_info.encode()).decode()
                    if self.headers.get("Authorization") != expected:
                        self._reply(401, {"error_code": 401, "message": "Unauthorized"})
                        return False
                return True

            def do_GET(self):
                if not self._allowed():
                    return
                match = re.fullmatch(r"/schemas/ids/(\d+)", self.path)
                if not match:
                    self._reply(404, {"error_code": 404, "message": "HTTP 404 Not Found"})
                    return
                found = standin.schemas.get(int(match.group(1)))
                if found is None:
                    self._reply(404, {"error_code": 40403, "message": "Schema not found"})
                    return
                body = {"schema": found[1]}
                if found[0] != "AVRO":
                    body["schemaType"] = found[0]
                self._reply(200, body)

            def do_POST(self):
                if not self._allowed():
                    return
                if not re.fullmatch(r"/subjects/[^/]+/versions", self.path):
                    self._reply(404, {"error_code": 404, "message": "HTTP 404 Not Found"})
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self._reply(200, {"id": standin.register(body["schema"], body.get("schemaType", "AVRO"))})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def register(self, schema: str, schema_type: str = "AVRO") -> int:
        with self._lock:
            for schema_id, known in self.schemas.items():
                if known == (schema_type, schema):
                    return schema_id
            schema_id = self._next_id
            self._next_id += 1
            self.schemas[schema_id] = (schema_type, schema)
            return schema_id

    def __enter__(self) -> "RegistryStandIn":
        from onceflow.io import schema_registry

        # The job's per-process clients cache schemas by ID for each registry URL: an
        # earlier stand-in on the same port (ports are reused) had other schemas.
        schema_registry._CLIENTS.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def register_over_http(url: str, subject: str, schema: dict, schema_type: str = "AVRO") -> int:
    """Registers ``schema`` through the REST API (as a producer would) and returns its ID."""
    import urllib.request

    body = {"schema": json.dumps(schema)}
    if schema_type != "AVRO":
        body["schemaType"] = schema_type
    request = urllib.request.Request(f"{url}/subjects/{subject}/versions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["id"]
