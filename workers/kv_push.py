"""Pushed KV handoff, prefill side: send a request's KV to the decode rank its ``Prefill`` named
(``push_to``) layer by layer while the prefill's last forward computes the later layers.

Why: with a pull the transfer starts only after the prefill ended and the router called ``Decode``;
all of it adds to the time to the second token. A push overlaps it with the last forward (DESIGN.md
§2: "send layer by layer as the prefill finishes each layer"), as Splitwise and Mooncake do.

Lifecycle of one ``KvPush`` (one ``Prefill`` with ``push_to``, p2p transport only):

1. ``KvPusher.prepare(request_id, target, num_tokens)``: picks the lease id and makes the
   ``LayerProgress`` the engine will report to. Nothing is sent yet: a request that waits in the
   queue or runs earlier chunks holds no transfer lane and no decode blocks.
2. The engine begins the request's last forward (``LayerProgress.begin``, on the step thread): the
   push starts on the service's loop. It starts the p2p sender over a ``ProgressKvSource`` (transfer
   id ``<lease id>/push``, so it never meets a pull of the same lease in the transfer store) and
   asks the decode rank to take it (``AcceptKv``, bounded by ``ACCEPT_TIMEOUT_S``). The decode rank
   reserves blocks and starts its receiver; the sender then sends layer i once the forward wrote it.
3. A refusal or a failed ``AcceptKv`` cancels the sender: the request falls back to the pull
   (``refused`` is set and the handle names no push). A refusal that comes after the handle left
   (``AcceptKv`` slower than the forward) is harmless: the decode rank finds no push and pulls.
4. The service grants the lease under the push's lease id and keeps the sender with its other
   senders: ``ReleaseKv``, ``Abort`` and lease expiry cancel it as they cancel a pull's. A prefill
   that ends without a lease (failed, aborted, the first token ended the request) cancels it.

The sender's deadline is the rank's transfer timeout from step 2: the last forward plus the move.
Only the last chunk of a chunked prefill overlaps; earlier chunks are sent with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.proto.cluster_token import authorized
from k2serve.workers.kv_lease import new_lease_id
from k2serve.workers.kv_progress import LayerProgress, ProgressKvSource
from k2serve.workers.kv_transfer import KvTransfer, SendFault
from k2serve.workers.kv_transport_p2p import P2pKvServer

logger = logging.getLogger(__name__)
ACCEPT_TIMEOUT_S = 2.0
MAX_CHANNELS = 64  # decode ranks this rank keeps a channel to (a restarted rank comes back at a new address)


def push_transfer_id(lease_id: str) -> str:
    return f"{lease_id}/push"


@dataclass
class KvPush:
    """One request's push (module docstring). ``sender`` is set once the last forward began."""

    request_id: str
    lease_id: str
    target: worker_pb2.KvTarget
    progress: LayerProgress
    handle: worker_pb2.KvHandle  # what AcceptKv tells the decode rank (no expiry yet)
    max_tokens: int  # the request's (0 = up to the context limit): the decode rank checks the whole fit
    sender: KvTransfer | None = None
    refused: str | None = None  # why the decode rank did not take it
    ended: bool = False  # cancelled (a sender started later never is)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def cancel(self, reason: str) -> None:
        self.ended = True
        if self.sender is not None:
            self.sender.cancel(reason)


class KvPusher:
    """The rank's pushes: one gRPC channel per decode rank it pushed to, reused (closed by ``close``)."""

    def __init__(
        self,
        server: P2pKvServer,
        kv_cache: Sequence[torch.Tensor],
        *,
        timeout_s: float,
        checksum: bool,
        next_fault: Callable[[], SendFault],
        on_sender_done: Callable[[KvTransfer], None],
        channel_options: Sequence[tuple[str, object]] = (),
        cluster_token: str | None = None,
    ) -> None:
        self._server = server
        self._kv_cache = list(kv_cache)
        self._timeout_s = timeout_s
        self._checksum = checksum
        self._next_fault = next_fault
        self._on_sender_done = on_sender_done
        self._channel_options = list(channel_options)
        self._cluster_token = cluster_token
        self._stubs: dict[str, tuple[grpc.aio.Channel, Any]] = {}  # LRU order: (channel, its authorized stub)
        self._closing: set[asyncio.Task[None]] = set()

    def prepare(
        self, request_id: str, target: worker_pb2.KvTarget, handle: worker_pb2.KvHandle, max_tokens: int
    ) -> KvPush:
        """A push for ``request_id`` to ``target``; ``handle`` is the KvHandle without lease id, filled here.
        Starts on its own once the engine begins the last forward (call from the service's loop)."""
        lease_id = new_lease_id(request_id)
        pushed = worker_pb2.KvHandle()
        pushed.CopyFrom(handle)
        pushed.lease_id = lease_id
        pushed.pushed_to = target.worker_id
        push = KvPush(request_id, lease_id, target, LayerProgress(len(self._kv_cache)), pushed, max_tokens)
        loop = asyncio.get_running_loop()
        push.progress.on_begin = lambda: loop.call_soon_threadsafe(self._begin, push)
        return push

    def _begin(self, push: KvPush) -> None:
        if push.ended:
            return
        source = ProgressKvSource(push.progress, self._kv_cache, push.handle.num_tokens)
        sender = self._server.start_send(
            push_transfer_id(push.lease_id),
            push.target.worker_id,
            source,
            checksum=self._checksum,
            timeout_s=self._timeout_s,
            fault=self._next_fault(),
        )
        sender.add_done_callback(self._on_sender_done)
        push.sender = sender
        task = asyncio.get_running_loop().create_task(self._accept(push), name=f"kv-push-{push.lease_id}")
        push.tasks.add(task)
        task.add_done_callback(push.tasks.discard)

    async def _accept(self, push: KvPush) -> None:
        try:
            stub = self._stub(push.target.address)
            answer = await stub.AcceptKv(
                worker_pb2.AcceptKvRequest(request_id=push.request_id, kv=push.handle, max_tokens=push.max_tokens),
                timeout=ACCEPT_TIMEOUT_S,
            )
            reason = None if answer.accepted else answer.reason or "refused"
        except grpc.aio.AioRpcError as exc:
            reason = f"AcceptKv failed: {exc.code().name}: {exc.details()}"
        if reason is not None:
            push.refused = reason
            logger.info(
                "push of %s to %s not taken (%s): the decode rank pulls", push.request_id, push.target.worker_id, reason
            )
            push.cancel(f"decode rank {push.target.worker_id} did not take the push: {reason}")

    def _stub(self, address: str) -> Any:
        entry = self._stubs.pop(address, None)
        if entry is None:
            if len(self._stubs) >= MAX_CHANNELS:  # the least recently used goes
                oldest = next(iter(self._stubs))
                task = asyncio.get_running_loop().create_task(self._stubs.pop(oldest)[0].close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            channel = grpc.aio.insecure_channel(address, options=self._channel_options)
            entry = (channel, authorized(worker_pb2_grpc.WorkerStub(channel), self._cluster_token))
        self._stubs[address] = entry  # last = most recently used
        return entry[1]

    async def close(self) -> None:
        stubs, self._stubs = self._stubs, {}
        for channel, _ in stubs.values():
            await channel.close()
