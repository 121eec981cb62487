"""Locust users for the router's OpenAI API: streaming ``POST /v1/chat/completions`` in a closed loop.

Usage:
    locust -f loadtest/locustfile_openai.py --headless -u 4 -r 2 -t 30s --host http://127.0.0.1:8000 --csv out/openai

Lifecycle: locust starts ``-u`` users; each one (``ChatStreamUser``) sends the next prompt of the
small prompt set as soon as its previous answer ended (``wait_time`` 0: the number of users is
the concurrency), with ``stream: true`` and ``stream_options.include_usage``. The request row
``POST /v1/chat/completions (stream)`` fails (``catch_response``) on a non-200 status, an SSE
``{"error": ...}`` event, a stream without ``[DONE]`` or without any token; a good answer adds the
``METRIC`` rows of ``locust_support`` (TTFT, mean ITL, TPOT, total latency; vLLM's definitions).
Settings come from the environment (``K2SERVE_MODEL``, ``K2SERVE_API_KEY``, ``K2SERVE_MAX_TOKENS``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from locust import HttpUser, constant, task

from k2serve.loadtest.bench_request import RequestRecord
from k2serve.loadtest.client import CHAT_PATH, apply_chunk, auth_headers, chat_body
from k2serve.loadtest.locust_support import LocustSettings, prompt_cycle, report_stream
from k2serve.loadtest.stream_recorder import StreamRecorder

REQUEST_NAME = f"POST {CHAT_PATH} (stream)"
REQUEST_TIMEOUT_S = 600.0


class ChatStreamUser(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.settings = LocustSettings.from_env()
        self.prompts = prompt_cycle(self.settings, offset=id(self))

    @task
    def chat(self) -> None:
        request = next(self.prompts)
        body = chat_body(request, self.settings.model, temperature=None, ignore_eos=False)
        if not self.settings.model:
            del body["model"]  # k2serve serves its one model when the field is left out
        start = time.perf_counter()
        recorder = StreamRecorder(request, origin=start, start=start)
        with self.client.post(
            CHAT_PATH,
            json=body,
            headers=auth_headers(self.settings.api_key),
            stream=True,
            catch_response=True,
            name=REQUEST_NAME,
            timeout=REQUEST_TIMEOUT_S,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:300]}")
                return
            record = _read_stream(response, recorder)
            if not record.success:
                response.failure(record.error)
                return
            response.success()
        report_stream(self.environment.events.request, record)


def _read_stream(response: Any, recorder: StreamRecorder) -> RequestRecord:
    try:
        for line in response.iter_lines(chunk_size=None, decode_unicode=True):  # each chunk as it arrives
            if not line or not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return recorder.record()
            error = apply_chunk(recorder, json.loads(data), time.perf_counter())
            if error is not None:
                return recorder.failed(error)
    except (OSError, ValueError) as exc:  # requests' connection errors are OSErrors
        return recorder.failed(f"{type(exc).__name__}: {exc}")
    return recorder.failed("the stream ended without [DONE]")
