"""Locust users for the router's gRPC API: ``k2serve.v1.Serving/Chat`` streams in a closed loop.

Usage:
    K2SERVE_GRPC_TARGET=127.0.0.1:50051 locust -f loadtest/locustfile_grpc.py --headless -u 4 -r 2 -t 30s --csv out/grpc

Lifecycle: importing locust patches the standard library with gevent; then, before any gRPC
object exists, ``grpc.experimental.gevent.init_gevent()`` makes grpcio's sync API cooperate with
gevent (without it a blocking stream read would stall every other user of the process). Each
``GrpcChatUser`` opens one channel in ``on_start`` (to ``K2SERVE_GRPC_TARGET``, else ``--host``
without its scheme), sends the next prompt as soon as its previous answer ended, reports the call
as a ``grpc`` request row ``Serving/Chat`` (failed on a gRPC status other than OK or a choice
finished with ``error``) and, for a good answer, the ``METRIC`` rows of ``locust_support``;
``on_stop`` closes the channel. Other settings: ``K2SERVE_MODEL``, ``K2SERVE_API_KEY``
(``authorization: Bearer`` metadata), ``K2SERVE_MAX_TOKENS``.
"""

from __future__ import annotations

import time

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, task

from k2serve.loadtest.bench_request import RequestRecord
from k2serve.loadtest.grpc_client import apply_response, chat_request
from k2serve.loadtest.locust_support import LocustSettings, prompt_cycle, report_stream
from k2serve.loadtest.stream_recorder import StreamRecorder
from k2serve.proto import serving_pb2_grpc

grpc_gevent.init_gevent()  # after locust's monkey patching, before any channel

REQUEST_TYPE, REQUEST_NAME = "grpc", "Serving/Chat"
DEFAULT_TARGET = "127.0.0.1:50051"
REQUEST_TIMEOUT_S = 600.0


class GrpcChatUser(User):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.settings = LocustSettings.from_env()
        self.prompts = prompt_cycle(self.settings, offset=id(self))
        target = self.settings.grpc_target or _target_of_host(self.host) or DEFAULT_TARGET
        self.channel = grpc.insecure_channel(target)
        self.stub = serving_pb2_grpc.ServingStub(self.channel)
        key = self.settings.api_key
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {key}"),) if key else ()

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def chat(self) -> None:
        request = next(self.prompts)
        start = time.perf_counter()
        recorder = StreamRecorder(request, origin=start, start=start)
        record = self._stream(recorder, chat_request(request, self.settings.model))
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE,
            name=REQUEST_NAME,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=record.output_tokens,
            response=None,
            context={},
            exception=None if record.success else RuntimeError(record.error),
        )
        if record.success:
            report_stream(self.environment.events.request, record)

    def _stream(self, recorder: StreamRecorder, message: object) -> RequestRecord:
        call = self.stub.Chat(message, timeout=REQUEST_TIMEOUT_S, metadata=self.metadata)
        try:
            for response in call:
                error = apply_response(recorder, response, time.perf_counter())
                if error is not None:
                    call.cancel()
                    return recorder.failed(error)
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            return recorder.failed(f"gRPC {code}: {details}")
        return recorder.record()


def _target_of_host(host: str | None) -> str | None:
    """``--host http://h:50051`` or ``h:50051`` -> ``h:50051``."""
    if not host:
        return None
    return host.split("://", 1)[-1].rstrip("/") or None
