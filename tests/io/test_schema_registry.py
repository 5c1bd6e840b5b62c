"""Registry-framed records: the wire format, each refusal reason, schema
evolution, JSON Schema, and the HTTP client (against a registry stand-in)."""

import io
import json
import pickle
import struct

import fastavro
import pytest

from onceflow.batches import Decoded, Refusal, decode_values
from onceflow.events import EventContract
from onceflow.io.schema_registry import (
    BadWireFormat, RegistryConfig, RegistryUnavailable, frame, kafka_settings_without_registry, registry_client,
    registry_settings, split_wire_format,
)
from tests.registry_standin import RegistryStandIn, register_over_http

WRITER_V1 = {"type": "record", "name": "Order", "namespace": "shop", "fields": [
    {"name": "order_id", "type": "string"},
    {"name": "event_time", "type": "string"},
    {"name": "store", "type": "string"},
    {"name": "qty", "type": "long"},
]}
# v2 adds a field with a default (backward compatible) and a field readers never asked for.
WRITER_V2 = {"type": "record", "name": "Order", "namespace": "shop", "fields": [
    *WRITER_V1["fields"], {"name": "note", "type": "string"},
    {"name": "price", "type": "double", "default": 0.0},
]}
READER = {"type": "record", "name": "Order", "namespace": "shop", "fields": [
    *WRITER_V1["fields"], {"name": "price", "type": "double", "default": 1.5},
]}
JSON_SCHEMA = {"type": "object", "required": ["order_id", "event_time", "store", "qty"],
               "properties": {"qty": {"type": "integer", "minimum": 0}, "store": {"type": "string"}}}


def avro_bytes(schema, record):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema, named_schemas={}), record)
    return out.getvalue()


def framed(schema_id, payload):  # written here with struct, independently of onceflow's frame()
    return b"\x00" + struct.pack(">I", schema_id) + payload


GOOD = {"order_id": "o-1", "event_time": "2026-01-01T00:00:10Z", "store": "s1", "qty": 3}


@pytest.fixture
def standin():
    with RegistryStandIn() as server:
        yield server


def contract(url, fmt="avro_registry", values=("qty",), reader=None, settings=()):
    return EventContract(time_field="event_time", key_fields=("store",), value_fields=values, id_field="order_id",
                         input_format=fmt, registry=RegistryConfig(url, settings), avro_reader_schema=reader)


def test_wire_format_round_trip_and_refusals():
    header = split_wire_format(frame(258, b"abc"))
    assert header.schema_id == 258 and bytes(header.payload) == b"abc"
    assert frame(258, b"") == b"\x00\x00\x00\x01\x02"
    with pytest.raises(BadWireFormat, match="shorter"):
        split_wire_format(b"\x00\x00\x01")
    with pytest.raises(BadWireFormat, match="magic byte is 1"):
        split_wire_format(b"\x01\x00\x00\x00\x01abc")
    with pytest.raises(ValueError):
        frame(2**32, b"")


def test_each_refusal_has_its_reason(standin):
    v1 = register_over_http(standin.url, "orders-value", WRITER_V1)
    json_id = register_over_http(standin.url, "other-value", JSON_SCHEMA, "JSON")
    good = framed(v1, avro_bytes(WRITER_V1, GOOD))
    values = [
        good,
        b"\x01" + good[1:],  # wrong magic byte
        b"\x00\x00",  # shorter than the header
        framed(999, avro_bytes(WRITER_V1, GOOD)),  # an ID the registry does not know
        framed(json_id, avro_bytes(WRITER_V1, GOOD)),  # the ID of a JSON schema
        framed(v1, b"\x02"),  # a truncated datum
        good + b"\x00",  # trailing bytes
        framed(v1, avro_bytes(WRITER_V1, {**GOOD, "event_time": "not a time"})),  # contract: bad time
    ]
    verdicts = decode_values(contract(standin.url), values)
    assert verdicts[0] == Decoded("o-1", 1767225610000, ("s1",), {"qty": 3})
    assert [v.reason for v in verdicts[1:]] == [
        "bad_wire_format", "bad_wire_format", "unknown_schema", "unknown_schema", "avro_decode_error",
        "avro_decode_error", "bad_timestamp"]
    # a value field the writer schema lacks: the contract's schema_violation
    missing = decode_values(contract(standin.url, values=("qty", "price")), [good])[0]
    assert missing == Refusal("schema_violation", "MissingField", "field 'price' is missing")


def test_writer_schemas_are_fetched_once_per_id_and_process(standin, monkeypatch):
    v1 = register_over_http(standin.url, "orders-value", WRITER_V1)
    values = [framed(v1, avro_bytes(WRITER_V1, {**GOOD, "order_id": f"o-{i}"})) for i in range(200)]
    the_contract = contract(standin.url)
    assert all(type(v) is Decoded for v in decode_values(the_contract, values))
    copy = pickle.loads(pickle.dumps(the_contract))  # what a worker gets
    assert all(type(v) is Decoded for v in decode_values(copy, values))
    gets = [r for r in standin.requests if r[0] == "GET"]
    assert len(gets) == 1 and gets[0][1] == f"/schemas/ids/{v1}"
    assert registry_client(copy.registry) is registry_client(the_contract.registry)
    # an unknown ID is asked for once for a run of records, then again once registered (after the TTL)
    unknown = [framed(v1 + 1, avro_bytes(WRITER_V1, GOOD))] * 50
    assert {v.reason for v in decode_values(the_contract, unknown)} == {"unknown_schema"}
    assert len([r for r in standin.requests if r[0] == "GET"]) == 2
    assert register_over_http(standin.url, "orders-value", {**WRITER_V1, "name": "Order2"}) == v1 + 1
    monkeypatch.setattr("onceflow.io.schema_registry.UNKNOWN_ID_TTL_S", 0.0)
    assert type(decode_values(the_contract, unknown[:1])[0]) is Decoded


def test_a_reader_schema_resolves_each_writer_version(standin):
    v1 = register_over_http(standin.url, "orders-value", WRITER_V1)
    v2 = register_over_http(standin.url, "orders-value", WRITER_V2)
    values = [framed(v1, avro_bytes(WRITER_V1, GOOD)),
              framed(v2, avro_bytes(WRITER_V2, {**GOOD, "order_id": "o-2", "note": "x", "price": 9.25}))]
    verdicts = decode_values(contract(standin.url, values=("qty", "price"), reader=READER), values)
    assert verdicts[0].values == {"qty": 3, "price": 1.5}  # the reader's default
    assert verdicts[1].values == {"qty": 3, "price": 9.25}
    # a writer the reader cannot resolve (qty is a string there) is an Avro decode error
    bad_writer = {**WRITER_V1, "fields": [*WRITER_V1["fields"][:3], {"name": "qty", "type": "string"}]}
    v3 = register_over_http(standin.url, "orders-value", bad_writer)
    refused = decode_values(contract(standin.url, reader=READER), [framed(v3, avro_bytes(bad_writer, {
        **GOOD, "qty": "3"}))])[0]
    assert refused.reason == "avro_decode_error"


def test_json_registry_validates_with_the_fetched_json_schema(standin):
    json_id = register_over_http(standin.url, "orders-value", JSON_SCHEMA, "JSON")
    avro_id = register_over_http(standin.url, "avro-value", WRITER_V1)
    good = framed(json_id, json.dumps(GOOD).encode())
    values = [
        good,
        framed(json_id, json.dumps({**GOOD, "qty": -1}).encode()),  # JSON Schema: minimum 0
        framed(json_id, b"{not json"),
        framed(avro_id, json.dumps(GOOD).encode()),  # an Avro schema's ID
        framed(77, json.dumps(GOOD).encode()),
        b"{" + json.dumps(GOOD).encode()[1:],  # plain JSON, not framed
    ]
    verdicts = decode_values(contract(standin.url, fmt="json_registry"), values)
    assert verdicts[0] == Decoded("o-1", 1767225610000, ("s1",), {"qty": 3})
    assert [v.reason for v in verdicts[1:]] == [
        "schema_violation", "malformed_json", "unknown_schema", "unknown_schema", "bad_wire_format"]
    assert "qty" in verdicts[1].message and verdicts[1].error_class == "JsonSchemaViolation"


def test_an_unreachable_registry_fails_loudly_and_refuses_no_record(standin):
    v1 = register_over_http(standin.url, "orders-value", WRITER_V1)
    standin.down = True
    the_contract = contract(standin.url, settings=(("max.retries", "1"),))
    with pytest.raises(RegistryUnavailable, match="HTTP 503"):
        decode_values(the_contract, [framed(v1, avro_bytes(WRITER_V1, GOOD))])
    assert len(standin.requests) == 3  # the registration, then 2 attempts
    standin.down = False  # back: the same record now decodes (nothing cached the failure)
    assert type(decode_values(the_contract, [framed(v1, avro_bytes(WRITER_V1, GOOD))])[0]) is Decoded
    # a URL that answers 404 without the registry's error code is a wrong URL, not an unknown schema
    wrong_path = contract(standin.url + "/not-the-api", settings=(("max.retries", "3"),))
    with pytest.raises(RegistryUnavailable, match="is .*/not-the-api the registry's URL"):
        decode_values(wrong_path, [framed(v1, avro_bytes(WRITER_V1, GOOD))])
    nobody = contract("http://127.0.0.1:9", settings=(("max.retries", "0"),))  # nothing listens on port 9
    with pytest.raises(RegistryUnavailable, match="127.0.0.1:9"):
        decode_values(nobody, [framed(v1, b"")])


def test_a_server_that_answers_no_http_is_unavailable_not_a_traceback():
    """A reply that is not HTTP (BadStatusLine) ended the job in a traceback."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer_garbage():
        for _ in range(2):
            connection, _ = listener.accept()
            connection.recv(65536)
            connection.sendall(b"this is not HTTP\r\n\r\n")
            connection.close()
    threading.Thread(target=answer_garbage, daemon=True).start()
    garbage = contract(f"http://127.0.0.1:{listener.getsockname()[1]}", settings=(("max.retries", "1"),))
    with pytest.raises(RegistryUnavailable, match=r"after 2 attempt\(s\): BadStatusLine"):
        decode_values(garbage, [framed(1, b"")])
    listener.close()


@pytest.mark.parametrize("url", ["http://alice:s3cret@127.0.0.1:8081", "alice:s3cret@127.0.0.1:8081"])
def test_credentials_in_the_url_are_refused_without_being_shown(url):
    with pytest.raises(ValueError, match="the URL holds credentials: give them as the setting basic.auth.user.info") \
            as error:
        RegistryConfig(url)
    assert "s3cret" not in str(error.value)


def test_credentials_are_sent_and_never_shown():
    with RegistryStandIn(user_info="reader:s3cret-pw") as server:
        v1 = server.register(json.dumps(WRITER_V1))
        settings = registry_settings(["basic.auth.user.info=reader:s3cret-pw"], {})
        the_contract = contract(server.url, settings=settings)
        assert "s3cret" not in repr(the_contract) and "s3cret" not in str(the_contract.registry)
        assert type(decode_values(the_contract, [framed(v1, avro_bytes(WRITER_V1, GOOD))])[0]) is Decoded
        wrong = contract(server.url, settings=(("basic.auth.user.info", "reader:wrong"),))
        with pytest.raises(RegistryUnavailable, match=r"after 1 attempt\(s\): HTTP 401") as error:  # not retried
            decode_values(wrong, [framed(v1, avro_bytes(WRITER_V1, GOOD))])
        assert "wrong" not in str(error.value)


def test_registry_settings_from_a_properties_file_and_flags():
    from_file = {"schema.registry.basic.auth.user.info": "a:b", "security.protocol": "SASL_SSL",
                 "schema.registry.request.timeout.ms": "2000"}
    assert registry_settings(None, from_file) == (("basic.auth.user.info", "a:b"), ("request.timeout.ms", "2000"))
    assert dict(registry_settings(["basic.auth.user.info=c:d"], from_file))["basic.auth.user.info"] == "c:d"
    with pytest.raises(ValueError, match="unknown setting 'colour'") as error:
        registry_settings(["colour=secret-value"], {})
    assert "secret-value" not in str(error.value)
    with pytest.raises(ValueError, match="http"):
        RegistryConfig("registry:8081")
    # A Confluent Cloud client properties file: the bare registry lines are the registry's, not librdkafka's.
    cloud = {"bootstrap.servers": "b:9092", "basic.auth.credentials.source": "USER_INFO",
             "basic.auth.user.info": "key:secret"}
    assert dict(registry_settings(None, cloud)) == {"basic.auth.credentials.source": "USER_INFO",
                                                    "basic.auth.user.info": "key:secret"}
    assert kafka_settings_without_registry(cloud) == {"bootstrap.servers": "b:9092"}
    with pytest.raises(ValueError, match="basic.auth.credentials.source: only USER_INFO is supported"):
        RegistryConfig("http://r:1", (("basic.auth.credentials.source", "SASL_INHERIT"),))


@pytest.mark.parametrize("pair", ["alice:RegSecret_42", "=alice:RegSecret_42"])
def test_a_setting_given_without_its_name_is_not_shown(pair):
    """``alice:PASSWORD`` for basic.auth.user.info was shown in the error whole (its
    first 20 characters with a leading '=')."""
    with pytest.raises(ValueError, match="--schema_registry_setting: a setting has no ") as error:
        registry_settings([pair], {})
    assert "RegSecret" not in str(error.value)


@pytest.mark.parametrize("flags, fragment", [
    (["--input_format=avro_registry"], "--schema_registry_url: --input_format avro_registry needs"),
    (["--schema_registry_url=http://127.0.0.1:8081"],
     "--schema_registry_url: only --input_format avro_registry or json_registry, or a kafka:// sink"),
    (["--schema_registry_setting=basic.auth.user.info=key:hunter2"],
     "--schema_registry_setting: only --input_format avro_registry or json_registry, or a kafka:// sink"),
    (["--input_format=avro_registry", "--schema_registry_url=registry:8081"], "is not an http:// or https:// URL"),
    (["--input_format=json_registry", "--schema_registry_url=http://r:1", "--avro_reader_schema=x.avsc"],
     "only --input_format avro_registry takes"),
    (["--input_format=avro_registry", "--schema_registry_url=http://r:1", "--avro_reader_schema=/nonexistent.avsc"],
     "is not a readable Avro schema"),
    (["--input_format=avro_registry", "--schema_registry_url=http://r:1",
      "--schema_registry_setting=basic.auth.password=hunter2"], "unknown setting 'basic.auth.password'"),
])
def test_registry_flags_are_checked(flags, fragment):
    from onceflow.errors import UsageError
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options

    with pytest.raises(UsageError) as error:
        job_from_options(parse_pipeline_args(["--input=kafka://127.0.0.1:19092/orders", *flags]))
    assert fragment in str(error.value) and "hunter2" not in str(error.value)


def test_registry_formats_read_kafka_not_files_and_take_credentials_from_the_properties_file(tmp_path):
    from onceflow.errors import UsageError
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options

    with pytest.raises(UsageError, match="read from a kafka://"):
        job_from_options(parse_pipeline_args([f"--input={tmp_path}/x.bin", "--input_format=avro_registry",
                                              "--schema_registry_url=http://r:1"]))
    properties = tmp_path / "client.properties"
    properties.write_text("security.protocol=PLAINTEXT\nschema.registry.basic.auth.user.info=u:pw\n")
    job = job_from_options(parse_pipeline_args([
        "--input=kafka://127.0.0.1:19092/orders", "--from=earliest", "--to=latest", "--input_format=avro_registry",
        "--schema_registry_url=http://r:1/", f"--kafka_config_file={properties}"]))
    assert job.contract.registry == RegistryConfig("http://r:1", (("basic.auth.user.info", "u:pw"),))
    assert dict(job.kafka.client_settings) == {"security.protocol": "PLAINTEXT"}  # librdkafka gets no registry key


def test_without_jsonschema_only_the_contract_validates_json_registry_records(standin, monkeypatch):
    json_id = register_over_http(standin.url, "orders-value", JSON_SCHEMA, "JSON")
    monkeypatch.setitem(__import__("sys").modules, "jsonschema", None)  # import jsonschema raises ImportError
    verdicts = decode_values(contract(standin.url, fmt="json_registry"), [
        framed(json_id, json.dumps({**GOOD, "qty": -1}).encode()),  # the JSON Schema's minimum is not checked
        framed(json_id, json.dumps({**GOOD, "qty": "many"}).encode()),  # the contract still is
    ])
    assert type(verdicts[0]) is Decoded and verdicts[0].values == {"qty": -1}
    assert verdicts[1].reason == "schema_violation"


def test_a_reply_that_was_no_schema_is_asked_again_not_kept(standin, monkeypatch):
    """A 200 whose schema text was not a schema (a proxy's page) stayed cached:
    every record of that ID was refused as unknown_schema for as long as the job
    ran, also after the registry answered right again."""
    from onceflow.io import schema_registry

    schema_id = standin.register("<html>oops</html>")
    the_contract = contract(standin.url)
    value = framed(schema_id, avro_bytes(WRITER_V1, GOOD))
    assert decode_values(the_contract, [value])[0].reason == "unknown_schema"
    standin.schemas[schema_id] = ("AVRO", json.dumps(WRITER_V1))  # the registry answers right again
    fetched = registry_client(the_contract.registry).fetches
    assert decode_values(the_contract, [value, value])[0].reason == "unknown_schema"  # no request per record
    assert registry_client(the_contract.registry).fetches == fetched
    monkeypatch.setattr(schema_registry, "UNKNOWN_ID_TTL_S", 0.0)  # the interval has passed
    assert type(decode_values(the_contract, [value])[0]) is Decoded


def test_a_reply_that_is_json_but_not_a_schema_object_is_the_registry_unavailable():
    """A 200 with the body [] crashed the job: 'list' object has no attribute 'get'."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class AnswersAList(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), AnswersAList)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(RegistryUnavailable, match=r"after 2 attempt\(s\): ValueError: the reply is not a schema"):
            decode_values(contract(url, settings=(("max.retries", "1"),)), [framed(1, b"")])
    finally:
        server.shutdown()


def test_a_json_schema_referring_to_another_document_refuses_its_records_and_fetches_nothing(standin):
    """Its $ref failed the whole job with jsonschema's traceback on every run, and
    jsonschema's default registry would fetch an http(s) reference from a worker."""
    requests = []
    with RegistryStandIn() as elsewhere:  # where the reference points: it must not be asked
        schema = {"type": "object", "properties": {"store": {"$ref": f"{elsewhere.url}/store.json"},
                                                   "qty": {"$ref": "qty.json"}}}
        json_id = standin.register(json.dumps(schema), "JSON")
        verdicts = decode_values(contract(standin.url, fmt="json_registry"),
                                 [framed(json_id, json.dumps(GOOD).encode())])
        requests = list(elsewhere.requests)
    assert verdicts[0].reason == "unknown_schema" and "another document" in verdicts[0].message
    assert requests == []


def test_a_registry_setting_that_reads_as_a_secret_is_not_shown():
    """USER:PASSWORD== (base64 ends so) was shown up to its first '='."""
    with pytest.raises(ValueError, match="unknown setting \\(not shown") as error:
        registry_settings(["auditu:S3cretPW=="], {})
    assert "S3cretPW" not in str(error.value)
