"""The live socket against its OpenAPI document (client/src/connector_credentials/client/openapi.json).

First every kind of answer the operator gives (a value, base64, each error status) is checked
against the document; then schemathesis generates requests from the document (valid and invalid
ones) and sends them to the live socket: no 500 (502 and 503 are documented verdicts), no answer
the document does not describe, and the operator still serves afterwards.

Schemathesis sends through ``requests``; ``tests/support/unixhttp.py`` gives requests a transport
adapter that dials the Unix socket, so schemathesis itself drives the socket.
"""

from __future__ import annotations

import os

import hypothesis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import World
from tests.support.openapi import document, problems
from tests.support.rawhttp import NOBODY, Reply, as_uid, exchange, request
from tests.support.unixhttp import BASE_URL, unix_session
from tests.support.watchstream import WatchStream

# Not schemathesis's not_a_server_error: 502 and 503 are documented verdicts (a credential whose check
# failed, a transient failure, a pending one); what must never come is a 500 (checked per answer).
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CREDENTIAL = "/v1/credentials/{namespace}/{name}"


def _streams(case: schemathesis.Case) -> bool:
    """A request that would open a watch stream: it never ends, so it is not sent by the fuzzer
    (test_every_kind_of_answer_conforms_to_the_document checks streams)."""
    query = case.query if isinstance(case.query, dict) else {}
    return str(query.get("watch", "")).strip().lower() in ("true", "1")


def _declare(world: World) -> None:
    proxy = world.proxy
    world.apply("plain", {"secretArn": world.secret("plain")})
    world.apply("blob", {"secretArn": world.secret("blob", binary=world.canary("blob").encode() + b"\x00\xff")})
    world.apply("denied", {"secretArn": world.secret("denied")})
    proxy.deny(secret_id_contains=f"{world.prefix}/denied")
    world.apply("throttled", {"secretArn": world.secret("throttled")})
    proxy.throttle(secret_id_contains=f"{world.prefix}/throttled")
    world.apply("badkey", {"secretArn": world.secret("badkey"), "jsonKey": "missing"})


def test_every_kind_of_answer_conforms_to_the_document(world: World) -> None:
    doc, ns, path = document(), world.namespace, world.socket_path
    os.chmod(world.workdir, 0o755)
    _declare(world)
    world.start_operator()
    world.wait_reason("plain", "AccessVerified")
    world.wait_reason("denied", "AccessDenied")
    world.wait_reason("throttled", "Throttled")
    world.wait_reason("badkey", "JsonKeyNotFound")
    cases = [
        (CREDENTIAL, f"/v1/credentials/{ns}/plain", 200),
        (CREDENTIAL, f"/v1/credentials/{ns}/plain?refresh=true", 200),
        (CREDENTIAL, f"/v1/credentials/{ns}/plain?refresh=0", 200),
        (CREDENTIAL, f"/v1/credentials/{ns}/blob", 200),
        (CREDENTIAL, f"/v1/credentials/{ns}/denied", 502),
        (CREDENTIAL, f"/v1/credentials/{ns}/badkey", 502),
        (CREDENTIAL, f"/v1/credentials/{ns}/throttled", 503),
        (CREDENTIAL, f"/v1/credentials/{ns}/undeclared", 404),
        (CREDENTIAL, f"/v1/credentials/{ns}/Not_A_Name", 400),
        (CREDENTIAL, f"/v1/credentials/{ns}/plain?refresh=maybe", 400),
        ("/v1/credentials", "/v1/credentials", 200),
        ("/v1/credentials", "/v1/credentials/", 200),
        ("/healthz", "/healthz", 200),
    ]
    for template, target, status in cases:
        reply = request(path, target)
        assert reply.status == status, (target, reply, reply.body[:300])
        assert problems(doc, template, reply) == [], target
    assert request(path, f"/v1/credentials/{ns}/blob").json()["encoding"] == "base64"
    for template in (CREDENTIAL, "/v1/credentials", "/healthz"):
        target = template.format(namespace=ns, name="plain")
        reply = request(path, target, method="POST")
        assert reply.status == 405 and problems(doc, template, reply) == [], target
        reply = exchange(path, f"GET {target} HTTP/1.0\r\n\r\n".encode())
        assert reply.status == 200 and problems(doc, template, reply) == [], target
    _, refused = as_uid(path, NOBODY, f"/v1/credentials/{ns}/plain", "/v1/credentials", "/healthz")
    for template, reply in zip((CREDENTIAL, "/v1/credentials", "/healthz"), refused, strict=True):
        assert reply.status == 403 and problems(doc, template, reply) == [], template

    # Watch streams: the head, and each kind of line (a value, each error status), against WatchEvent.
    for name, status in (("plain", 200), ("blob", 200), ("denied", 502), ("throttled", 503), ("undeclared", 404)):
        for flag in ("true", "1", "TRUE"):
            with WatchStream(path, f"/v1/credentials/{ns}/{name}?watch={flag}&refresh=false") as stream:
                (line,) = stream.wait_documents(1)
                assert line["status"] == status, (name, line["status"])
                reply = Reply(stream.status, "HTTP/1.1", stream.headers, stream.lines[0].data + b"\n")
                assert reply.headers["transfer-encoding"] == "chunked"
                assert problems(doc, CREDENTIAL, reply) == [], (name, flag)
    for target in (f"/v1/credentials/{ns}/plain?watch=maybe", f"/v1/credentials/{ns}/plain?watch=true&refresh=x"):
        reply = request(path, target)
        assert reply.status == 400 and problems(doc, CREDENTIAL, reply) == [], target
    reply = exchange(path, f"GET /v1/credentials/{ns}/plain?watch=true HTTP/1.0\r\n\r\n".encode())
    assert reply.status == 400 and problems(doc, CREDENTIAL, reply) == []


def test_requests_generated_from_the_document_get_documented_answers(world: World) -> None:
    ns, path = world.namespace, world.socket_path
    _declare(world)
    process = world.start_operator()
    world.wait_reason("plain", "AccessVerified")
    world.wait_reason("denied", "AccessDenied")
    schema = schemathesis.openapi.from_dict(document())
    session = unix_session(path)
    names = st.sampled_from(["plain", "blob", "denied", "throttled", "badkey", "undeclared"])
    sent: list[int] = []

    def exercise(operation: object, strategy: st.SearchStrategy[schemathesis.Case]) -> None:
        @given(case=strategy)
        @settings(
            max_examples=60,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=BASE_URL, session=session, timeout=15)
            sent.append(response.status_code)
            assert response.status_code != 500, case.as_curl_command()
            case.validate_response(response, checks=CHECKS)

        run()

    try:
        for template, method in ((CREDENTIAL, "GET"), ("/v1/credentials", "GET"), ("/healthz", "GET")):
            operation = schema[template][method]
            # Only the credential path has parameters to get wrong: the others have no negative cases.
            modes = (
                (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                if template == CREDENTIAL
                else (GenerationMode.POSITIVE,)
            )
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode).filter(lambda case: not _streams(case))
                if template == CREDENTIAL and mode is GenerationMode.POSITIVE:
                    # Mostly names that exist in this world, so that values and verdicts are fuzzed too.
                    strategy = st.one_of(
                        strategy,
                        st.builds(
                            lambda name, refresh, operation=operation: operation.Case(
                                path_parameters={"namespace": ns, "name": name}, query=refresh
                            ),
                            names,
                            st.sampled_from([None, {"refresh": "true"}, {"refresh": "0"}, {"refresh": ""}]),
                        ),
                    )
                exercise(operation, strategy)
    finally:
        session.close()
    print(f"\n{len(sent)} generated requests; statuses: {sorted(set(sent))}")
    assert len(sent) >= 100, len(sent)
    assert process.running
    assert request(path, "/healthz").status == 200
    assert request(path, f"/v1/credentials/{ns}/plain").status == 200
    world.assert_no_leaks()
