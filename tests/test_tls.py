"""TLS on the router's REST and gRPC listeners (reliability.md §3 S7): certificates from a throwaway CA
(made here with ``cryptography``), a real ``RouterServer`` in front of a real worker rank.

- With ``tls`` (certificate + key): a client that trusts the CA streams a chat over HTTPS (httpx and
  the official openai SDK) and over gRPC (``ssl_channel_credentials``); plain HTTP, a client that
  does not trust the CA, and an insecure gRPC channel all fail.
- With a CA as well (mutual TLS): a client without a certificate is refused on both listeners, one
  with a certificate the CA signed gets in.
- Settings: certificate and key both or neither, every file must exist and load, each error names
  its setting (cluster YAML ``router.tls_*``, ``k2serve router --tls-*``).
- The REST listener's header deadline (plaintext router, ``header_timeout_s``): a client that does
  not finish its request head in time (slowloris), or sends nothing, is disconnected; one that
  does is answered, and its keep-alive connection gets the same deadline for the next request.

Router -> worker gRPC stays plaintext on the cluster's private interface (docs/OPERATIONS.md, TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import httpx2
import openai
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from k2serve.cli import main as cli_main
from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.config_error import ClusterConfigError
from k2serve.proto import serving_pb2, serving_pb2_grpc
from k2serve.router.admission import Admission, AdmissionLimits
from k2serve.router.chat_template import ChatTemplate
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.frontend import Frontend, ServedModel
from k2serve.router.router_server import RouterOptions, RouterServer, TlsError, TlsFiles
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.router.worker_client import WorkerEndpoint
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.group_rank import GroupRank, RankSpec
from k2serve.workers.service import WorkerOptions, WorkerServer

MAX_MODEL_LEN = 256
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


# ---- certificates --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_cert: Path  # a second self-signed "CA" that signed nothing here (for a mismatched key)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert + CRL signing
        builder = builder.add_extension(usage, critical=True)
    elif server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (folder / f"{name}.key").write_bytes(pem)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key, other_key = _key(), _key(), _key(), _key()
    ca = _cert("k2serve test CA", ca_key, None, ca=True)
    issuer = (ca.subject, ca_key)
    _write(folder, "ca", ca)
    _write(folder, "server", _cert("localhost", server_key, issuer, server=True), server_key)
    _write(folder, "client", _cert("a client", client_key, issuer), client_key)
    _write(folder, "other", _cert("other", other_key, None, ca=True), other_key)
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_cert=folder / "other.pem",
    )


# ---- two routers (TLS, mutual TLS) over one worker -----------------------------------------------------------


HEADER_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class Routers:
    tls: RouterServer
    mutual: RouterServer
    plain: RouterServer  # no TLS, a short header deadline


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Routers]:
    """A mixed worker rank and two routers in front of it, on one loop in a background thread."""
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tls") / "tiny", preset="tiny")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tls-routers", daemon=True)
    thread.start()
    dispatcher = Dispatcher()
    started: list[RouterServer] = []
    workers: list[WorkerServer] = []

    async def start() -> Routers:
        spec = RankSpec(model_dir=model_dir, num_blocks=128, block_size=4, max_model_len=MAX_MODEL_LEN)
        rank = await asyncio.to_thread(GroupRank.build, spec)
        worker = await WorkerServer.start(rank, WorkerOptions("mixed-0", "mixed"))
        workers.append(worker)
        await dispatcher.update([WorkerEndpoint("mixed-0", "mixed", worker.address)])
        model = ServedModel(model_dir.name, str(model_dir), MAX_MODEL_LEN)
        tokenizer, template = KimiTokenizer.from_model_dir(model_dir), ChatTemplate.from_model_dir(model_dir)
        for ca in (None, pki.ca):
            frontend = Frontend(dispatcher, tokenizer, template, model, Admission(AdmissionLimits()))
            tls = TlsFiles.of(pki.server_cert, pki.server_key, ca)
            options = RouterOptions(host="127.0.0.1", port=0, grpc_port=0, tls=tls)
            started.append(await RouterServer.start(frontend, options))
        frontend = Frontend(dispatcher, tokenizer, template, model, Admission(AdmissionLimits()))
        options = RouterOptions(host="127.0.0.1", port=0, grpc_port=-1, header_timeout_s=HEADER_TIMEOUT_S)
        started.append(await RouterServer.start(frontend, options))
        return Routers(*started)

    async def stop() -> None:
        for router in started:
            await router.stop(grace_s=0)
        await dispatcher.close()
        for worker in workers:
            await worker.stop(grace_s=1.0)

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def _trusting(pki: Pki, *, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def _stream_chat(client: httpx.Client, url: str) -> list[str]:
    events = []
    with client.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return events


# ---- TLS ----------------------------------------------------------------------------------------------------


def test_a_client_that_trusts_the_ca_streams_a_chat_over_https(routers: Routers, pki: Pki) -> None:
    url = routers.tls.http_url
    assert url.startswith("https://")  # the ready line prints this URL
    with httpx.Client(verify=_trusting(pki), timeout=60) as client:
        events = _stream_chat(client, url)
    assert events[-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c.get("finish_reason")]
    assert finishes == ["length"]


def test_plain_http_and_a_client_that_does_not_trust_the_ca_fail(routers: Routers, pki: Pki) -> None:
    plain = routers.tls.http_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # the TLS listener closes a plaintext request
        httpx.get(f"{plain}/health", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{routers.tls.http_url}/health", timeout=10)  # the system's CAs only
    assert httpx.get(f"{routers.tls.http_url}/health", verify=_trusting(pki), timeout=10).status_code == 200


def test_the_openai_sdk_with_the_ca_works_over_https(routers: Routers, pki: Pki) -> None:
    with httpx2.Client(verify=_trusting(pki), timeout=60) as http_client:  # the SDK's own httpx
        client = openai.OpenAI(base_url=f"{routers.tls.http_url}/v1", api_key="none", http_client=http_client)
        answer = client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 4


def test_grpc_with_the_ca_works_and_an_insecure_channel_fails(routers: Routers, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(routers.tls.grpc_target, credentials) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        request = serving_pb2.ChatRequest(
            messages=[serving_pb2.ChatMessage(role="user", content="hi")],
            sampling=serving_pb2.SamplingParams(temperature=0.0, max_tokens=4),
        )
        messages = list(stub.Chat(request, timeout=60))
    assert [m.finish_reason for m in messages if m.finish_reason] == ["length"]
    with grpc.insecure_channel(routers.tls.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            serving_pb2_grpc.ServingStub(channel).ListModels(serving_pb2.ListModelsRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- mutual TLS ---------------------------------------------------------------------------------------------


def test_mutual_tls_refuses_a_client_without_a_certificate_and_admits_one_the_ca_signed(
    routers: Routers, pki: Pki
) -> None:
    url = routers.mutual.http_url
    with pytest.raises(httpx.HTTPError):  # the handshake (or its first read) fails: no certificate
        httpx.get(f"{url}/health", verify=_trusting(pki), timeout=10)
    with httpx.Client(verify=_trusting(pki, client_cert=True), timeout=60) as client:
        assert _stream_chat(client, url)[-1] == "[DONE]"

    ca = pki.ca.read_bytes()
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(routers.mutual.grpc_target, anonymous) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            serving_pb2_grpc.ServingStub(channel).ListModels(serving_pb2.ListModelsRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    known = grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    with grpc.secure_channel(routers.mutual.grpc_target, known) as channel:
        models = serving_pb2_grpc.ServingStub(channel).ListModels(serving_pb2.ListModelsRequest(), timeout=10)
    assert len(models.models) == 1


# ---- settings -----------------------------------------------------------------------------------------------


def test_tls_files_are_both_or_neither_must_exist_and_load(pki: Pki, tmp_path: Path) -> None:
    assert TlsFiles.of(None, None) is None
    with pytest.raises(TlsError, match="tls_key: is required with tls_cert") as missing:
        TlsFiles.of(pki.server_cert, None)
    assert missing.value.field == "tls_key"
    with pytest.raises(TlsError) as lone_ca:
        TlsFiles.of(None, None, pki.ca)
    assert lone_ca.value.field == "tls_ca"
    with pytest.raises(TlsError, match="no such file") as absent:
        TlsFiles.of(tmp_path / "nope.pem", pki.server_key)
    assert absent.value.field == "tls_cert"
    with pytest.raises(TlsError) as mismatched:  # a key that is not the certificate's
        TlsFiles.of(pki.server_cert, pki.other_cert.with_suffix(".key"))
    assert mismatched.value.field == "tls_key"
    mutual = TlsFiles.of(pki.server_cert, pki.server_key, pki.ca)
    assert mutual is not None and mutual.mutual


def test_the_cluster_yaml_router_tls_settings_name_the_field(pki: Pki, tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny", preset="tiny")
    base = ClusterConfig.demo(model, colocated=True).to_dict()

    def read(**router: object) -> ClusterConfig:
        data = {**base, "router": {**base["router"], **router}}
        path = tmp_path / "cluster.yaml"
        path.write_text(yaml.safe_dump(data))
        return ClusterConfig.from_yaml(path)

    config = read(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_ca=str(pki.ca))
    assert (config.router.tls_cert, config.router.tls_ca) == (str(pki.server_cert), str(pki.ca))
    assert ClusterConfig.from_dict(config.to_dict()) == config
    for router, field in (
        ({"tls_cert": str(pki.server_cert)}, "router.tls_key"),
        ({"tls_key": str(pki.server_key)}, "router.tls_cert"),
        ({"tls_ca": str(pki.ca)}, "router.tls_ca"),
        ({"tls_cert": str(tmp_path / "absent.pem"), "tls_key": str(pki.server_key)}, "router.tls_cert"),
    ):
        with pytest.raises(ClusterConfigError) as bad:
            read(**router)
        assert bad.value.field == field, bad.value


def test_k2serve_router_refuses_a_certificate_without_its_key(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["router", str(tmp_path), "--worker", "w=mixed@127.0.0.1:1", "--tls-cert", str(pki.server_cert)]
    assert cli_main(args) == 2
    assert "--tls-key: is required with --tls-cert" in capsys.readouterr().err


# ---- the header deadline --------------------------------------------------------------------------------------


def _closed_after(conn: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes ``conn`` (reads EOF); fails after ``limit_s``."""
    started = time.monotonic()
    conn.settimeout(limit_s)
    received = b""
    while chunk := conn.recv(4096):
        received += chunk
    assert b"HTTP/1.1" not in received, received  # closed without an answer
    return time.monotonic() - started


def test_a_client_that_does_not_finish_its_headers_in_time_is_disconnected(routers: Routers) -> None:
    host, port = "127.0.0.1", routers.plain.http_port
    with socket.create_connection((host, port), timeout=5) as silent:  # connects, sends nothing
        assert _closed_after(silent, 5.0) < HEADER_TIMEOUT_S + 2.0
    with socket.create_connection((host, port), timeout=5) as slow:  # one header line at a time (slowloris)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the server may close while a line is on its way
            for _ in range(20):
                time.sleep(HEADER_TIMEOUT_S / 4)
                slow.sendall(b"X-Slow: 1\r\n")
        assert _closed_after(slow, 5.0) + (time.monotonic() - started) < HEADER_TIMEOUT_S + 4.0
    with socket.create_connection((host, port), timeout=5) as prompt:  # a whole head at once is answered
        prompt.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert prompt.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT_S / 2)
        prompt.sendall(b"GET /health HTTP/1.1\r\n")  # the next request on the keep-alive connection stalls
        assert _closed_after(prompt, 5.0) < HEADER_TIMEOUT_S + 2.0
