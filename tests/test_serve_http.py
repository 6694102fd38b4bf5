"""The HTTP API's routing as a client or an operator's tooling meets it, in process (FastAPI's TestClient):
the OpenAPI schema a client generator reads, and the answers to paths, methods, query strings and body
encodings that the API does not take."""

from __future__ import annotations

import warnings

import pytest
from test_export_hf import SENTENCES, make_run

from tformer.training.checkpoint_load import load_run

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from tformer.serving import ServeConfig, create_app

    loaded = load_run(make_run(tmp_path_factory.mktemp("serve_http") / "run"))
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig())
    with TestClient(app) as client:
        yield client


def test_the_openapi_schema_gives_each_operation_its_own_id_without_a_warning(client):
    """/health and /ready answered GET and HEAD in one route, which FastAPI gives one operation id: both
    operations of each probe had the same id (a client generator refuses or overwrites one), and FastAPI
    warned "Duplicate Operation ID" whenever the schema was built."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client.app.openapi_schema = None  # built anew, as on the first request for it
        schema = client.app.openapi()
    ids = [operation["operationId"] for methods in schema["paths"].values() for operation in methods.values()]
    assert len(ids) == 5 and len(set(ids)) == len(ids), ids
    for path in ("/health", "/ready"):
        assert sorted(schema["paths"][path]) == ["get", "head"]
        assert client.get(path).status_code == 200 and client.head(path).status_code == 200
        wrong_method = client.put(path)
        assert wrong_method.status_code == 405
        assert wrong_method.json() == {"error": f"PUT {path}: method not allowed; use GET or HEAD"}
        assert sorted(wrong_method.headers["allow"].split(", ")) == ["GET", "HEAD"]


@pytest.mark.parametrize(("method", "path"), [("POST", "/translate/"), ("GET", "/health/"), ("GET", "/ready/")])
def test_a_trailing_slash_is_a_404_naming_the_path_without_it_not_a_redirect(client, method, path):
    """`POST /translate/` was a 307 to /translate with an empty body: a client that does not follow redirects
    (curl without -L, httpx by default) got no translation and no error saying why, and the redirect's
    absolute Location, built from the Host header, pointed to plain http behind a TLS proxy."""
    response = client.request(method, path, json={"sentences": ["hello dog"]}, follow_redirects=False)
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json() == {"error": f"no such path: {path}; send it to {path[:-1]}, without the trailing slash"}


def test_an_unknown_path_is_a_404_listing_the_api_s_paths(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json() == {
        "error": "no such path: /nowhere; the API has GET /health, GET /ready, POST /translate (docs at /docs)"
    }


@pytest.mark.parametrize("encoding", ["gzip", "br", "GZIP"])
def test_a_compressed_body_is_a_415_saying_to_send_it_uncompressed(client, encoding):
    """A gzip body (some clients compress large uploads) was read as it came: a 400 saying the body "is not
    valid UTF-8: byte 0x8B at offset 1 ... send the JSON encoded as UTF-8", which sent the client looking at
    its text instead of its compression. RFC 9110 15.5.16: 415, with the encodings taken in Accept-Encoding."""
    import gzip
    import json

    body = gzip.compress(json.dumps({"sentences": SENTENCES[:1]}).encode())
    headers = {"content-type": "application/json", "content-encoding": encoding}
    response = client.post("/translate", content=body, headers=headers)
    assert response.status_code == 415 and response.headers["accept-encoding"] == "identity"
    assert response.json() == {
        "error": f"the request body is compressed (content-encoding: {encoding.lower()}); send it uncompressed"
    }
    identity = client.post("/translate", json={"sentences": SENTENCES[:1]}, headers={"content-encoding": "identity"})
    assert identity.status_code == 200


def test_a_query_parameter_on_translate_is_a_422_not_ignored(client):
    """`POST /translate?beam=5` decoded with the server's beam, silently: the query string was not read,
    though an unknown field in the body is refused for that very reason."""
    response = client.post("/translate?beam=5&colour=red", json={"sentences": SENTENCES[:1]})
    assert response.status_code == 422
    assert response.json() == {
        "error": "POST /translate reads no query parameters (got beam, colour); send the options in the JSON body"
    }


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_json_with_a_bom_or_in_utf_16_or_32_is_read_as_in_utf_8(client, encoding):
    """Pins a choice (docs/serving.md): RFC 8259 asks senders for UTF-8 without a BOM, lets a parser ignore
    a BOM, and leaves other encodings to the parser; the server reads what Python's json reads (UTF-16 and
    UTF-32, told apart by their BOM or their zero bytes), which no UTF-8 JSON text can be mistaken for."""
    body = '{"sentences": ["hello dog", "caf\u00e9 \U0001f600"]}'
    utf8 = client.post("/translate", content=body.encode(), headers={"content-type": "application/json"})
    other = client.post("/translate", content=body.encode(encoding), headers={"content-type": "application/json"})
    assert utf8.status_code == 200 and other.status_code == 200
    assert other.json() == utf8.json()


@pytest.mark.parametrize(
    ("method", "path", "allowed"), [("GET", "/translate", "POST"), ("POST", "/ready", "GET or HEAD")]
)
def test_a_wrong_method_is_a_405_saying_which_to_use(client, method, path, allowed):
    """`curl localhost:8000/translate` (a GET, as a browser sends) answered {"error": "Method Not Allowed"},
    which named neither the method to use nor the one sent."""
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.json() == {"error": f"{method} {path}: method not allowed; use {allowed}"}


LONG = "9" * 4000  # a value of thousands of characters, under Python's 4300-digit limit for integers
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "start"),
    [
        ("POST", "/translate", '{"sentences": ["a"], "beam": ' + LONG + "}", JSON, 422, "beam: at most 8, got 99"),
        ("POST", "/translate", '{"sentences": ["a"], "nbest": ' + LONG + "}", JSON, 422, "nbest: at most beam"),
        ("POST", "/translate", '{"sentences": ["a"], "max_length": ' + LONG + "}", JSON, 422, "max_length: at most 64"),
        ("POST", "/translate", '{"sentences": ["a"], "' + LONG + '": 1}', JSON, 422, "9999"),
        ("POST", f"/translate?{LONG}=1", '{"sentences": ["a"]}', JSON, 422, "POST /translate reads no query"),
        ("GET", f"/{LONG}", "", {}, 404, "no such path: /99"),
        ("POST", "/translate", '{"sentences": ["a"]}', {"content-type": f"text/{LONG}"}, 415, "send the body as JSON"),
        ("POST", "/translate", "{}", JSON | {"content-encoding": LONG}, 415, "the request body is compressed"),
    ],
    ids=["beam", "nbest", "max_length", "unknown-field", "query", "path", "content-type", "content-encoding"],
)
def test_a_long_value_the_client_sent_is_quoted_cut_to_a_short_line(client, method, path, body, headers, status, start):
    """A 4,000-digit beam (or nbest, max_length, a field's name, a path, a header) came back in full in
    the error: an answer as long as what the client sent, and a line no log or terminal shows whole."""
    response = client.request(method, path, content=body.encode(), headers=headers)
    assert response.status_code == status
    message = response.json()["error"]
    assert message.startswith(start) and len(message) < 200, message
    assert "... (4,0" in message
