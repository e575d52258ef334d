"""Canary: unique values through every path, then a search of everything the world can see.

Every integration test ends with the same search (see ``World.assert_no_leaks``); this one
drives as many paths as one run can: verification, rotation, jsonKey, binary, a secret that
becomes unreadable, failures whose messages quote AWS, socket reads and error bodies, watch
streams, the CLI, and the operator's shutdown — all with ``--verbose`` and with ``--debug``.
Values must appear in the socket's 200 bodies and watch streams' 200 lines, and nowhere else.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse

import pytest

from connector_credentials.client import CredentialError, CredentialUnavailable
from tests.integration.conftest import World
from tests.support.runner import console_script, wait_until
from tests.support.watchstream import WatchStream


@pytest.mark.parametrize("verbosity", ["--verbose", "--debug"])
def test_no_value_escapes_through_any_path(world: World, verbosity: str) -> None:
    plain = world.secret("plain")
    token = world.canary("token")
    document = world.secret("json", string=json.dumps({"api_token": token, "other": world.canary("other")}))
    binary_value = b"\x00\x01" + world.canary("binary").encode()
    world.canaries.append(binary_value.decode("latin-1"))
    binary = world.secret("binary", binary=binary_value)
    not_json = world.secret("not-json")  # jsonKey on a non-JSON value: the error must not quote it
    turning = world.secret("turning")

    world.apply("plain", {"secretArn": plain, "refreshInterval": "5s"})
    world.apply("json", {"secretArn": document, "jsonKey": "api_token"})
    world.apply("binary", {"secretArn": binary})
    world.apply("not-json", {"secretArn": not_json, "jsonKey": "api_token"})
    world.apply("turning", {"secretArn": turning})
    operator = world.start_operator(args=(verbosity,))
    for name in ("plain", "json", "binary", "turning"):
        world.wait_reason(name, "AccessVerified")
    world.wait_reason("not-json", "JsonKeyNotFound")

    bodies: list[str] = []
    streams = {
        name: WatchStream(world.socket_path, f"/v1/credentials/{world.namespace}/{name}?watch=true").start()
        for name in ("plain", "json", "turning")
    }
    for stream in streams.values():
        stream.wait_documents(1)
    with world.client() as client:
        assert client.get(world.namespace, "plain").value in world.canaries
        assert client.get(world.namespace, "json").value == token
        assert client.get(world.namespace, "binary").as_bytes() == binary_value
        # Rotation while running (refreshInterval 5s), read back through the socket.
        rotated = world.canary("rotated")
        world.aws.put_value(plain, string=rotated)
        assert client.get(world.namespace, "plain", refresh=True).value == rotated
        # A secret that becomes unreadable: stops being served, error bodies carry no value.
        world.proxy.deny(secret_id_contains=f"{world.prefix}/turning")
        with pytest.raises(CredentialUnavailable) as denied:
            client.get(world.namespace, "turning", refresh=True)
        bodies.append(str(denied.value))
        for name in ("not-json", "nope"):
            try:
                client.get(world.namespace, name)
            except CredentialError as exc:
                bodies.append(f"{exc.reason}: {exc.message}")
        bodies.append(repr(client.list()))
        bodies.append(_raw_get(world.socket_path, "/v1/credentials"))
    world.wait_reason("turning", "AccessDenied")
    streams["plain"].wait(lambda s: any(rotated in line.data.decode() for line in s.lines), 10, "no rotation line")
    streams["turning"].wait(lambda s: s.documents()[-1]["status"] == 502, 10, "no AccessDenied line")

    # The CLI without --show prints metadata and a mask only.
    cli = subprocess.run(
        [console_script(), "get", f"{world.namespace}/json", "--socket-path", world.socket_path],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "versionId" in cli.stdout
    bodies.append(cli.stdout + cli.stderr)

    # Raw error bodies for malformed requests, straight from the socket.
    for path in ("/v1/credentials/" + urllib.parse.quote("../x"), "/nope", "/v1/credentials/a/b/c"):
        bodies.append(_raw_get(world.socket_path, path))

    world.delete("json")
    wait_until(lambda: "Forgot" in operator.output, timeout=10, message="deletion not noticed")
    streams["json"].wait(lambda s: s.documents()[-1]["status"] == 404, 10, "no NotFound line")
    operator.stop()

    # The values are in the watch streams' 200 lines, as in the 200 bodies; their error lines hold none.
    watched = {name: stream.documents() for name, stream in streams.items()}
    for stream in streams.values():
        assert stream.wait_end() == "clean"
        stream.close()
    values = "\n".join(json.dumps(d) for lines in watched.values() for d in lines if d["status"] == 200)
    for value in (rotated, token, *[c for c in world.canaries if c.startswith(("CANARY-plain-", "CANARY-turning-"))]):
        assert value in values, "a watch stream did not carry the value"
    bodies += [json.dumps(d) for lines in watched.values() for d in lines if d["status"] != 200]
    assert len(bodies) > 10

    everything = "\n".join(bodies)
    for canary in world.canaries:
        assert canary not in everything, "a value leaked into an error body or the CLI's masked output"
    # The fixture then searches every object, event and the operator's whole output.


def _raw_get(socket_path: str, path: str) -> str:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")
