"""``ParallelContext``: one rank's membership of its expert-parallel group, and the collectives it uses.

Lifecycle: every rank process calls ``ParallelContext.create(rendezvous, rank, size, ...)`` once at
start; it connects to the group's ``TCPStore`` (rank 0 or the launcher hosts it) and builds a
process group directly from that store (``ProcessGroupGloo`` on CPU, NCCL on CUDA), not through
``torch.distributed.init_process_group``, so a process can belong to its EP group and to other
groups (KV-transfer pairs) at the same time and nothing global is touched. The context is passed
explicitly to whatever needs it (the all-to-all dispatcher, the lockstep) and ``close()``d at exit.
``ParallelContext.single()`` is the EP=1 context: no group, and every collective is the identity.

Failure rule: every collective waits at most ``timeout_s``. A dead or stuck peer turns into a
``GroupError`` on every surviving rank (gloo reports a closed connection at once, a silent peer
after the timeout), never into a hang; after one, the group is unusable and the rank must fail
its requests and be restarted by its owner.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 30.0


class CollectiveBackend(Protocol):
    """The methods of ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` used here (torch's stubs omit them)."""

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor]) -> dist.Work: ...
    def allreduce(self, tensors: list[torch.Tensor]) -> dist.Work: ...
    def alltoall_base(
        self, output: torch.Tensor, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int]
    ) -> dist.Work: ...
    def shutdown(self) -> None: ...


class GroupError(RuntimeError):
    """A collective of the expert-parallel group failed (peer dead, stuck past the timeout, or the
    group was already broken). The message names the rank and the operation."""


@dataclass(frozen=True)
class Rendezvous:
    """Where a group's ``TCPStore`` listens: ``host:port``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Rendezvous:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rendezvous: expected HOST:PORT, got {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def host_store(host: str, *, port: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """Start a store server listening on ``host`` only (port 0 = any free port: read ``.port``).

    ``TCPStore`` given a host and port still listens on every interface, so the socket is bound
    here and handed over; 0.0.0.0 is reached only when the caller names it. The server lives as
    long as the returned object; ranks connect to it as clients.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        store = dist.TCPStore(
            host,
            sock.getsockname()[1],
            None,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=sock.fileno(),
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now
    return store


@dataclass
class ParallelContext:
    """Rank ``rank`` of ``size``; ``group`` is None for EP=1."""

    rank: int
    size: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: CollectiveBackend | None = None  # ProcessGroupGloo / ProcessGroupNCCL, used directly (no global world)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _store: dist.Store | None = None
    _broken: str | None = None

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelContext:
        return cls(rank=0, size=1, device=torch.device(device))

    @classmethod
    def create(
        cls,
        rendezvous: Rendezvous | str,
        rank: int,
        size: int,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        join_timeout_s: float | None = None,
        device: torch.device | str = "cpu",
        interface_host: str | None = None,
        prefix: str = "ep",
    ) -> ParallelContext:
        """Join the group at ``rendezvous`` (a running store, see ``host_store``).

        ``join_timeout_s`` bounds forming the group (the store and the backend's handshake; default
        ``timeout_s``): the cluster gives it its start timeout, since the ranks of one group may start
        far apart on a loaded node, while ``timeout_s`` bounds every collective after that (``_wait``),
        so a short collective timeout for fast failure detection does not make group starts fail.

        ``interface_host``: the address gloo binds its own connections to (default: the rendezvous
        host, so a loopback rendezvous keeps every internal connection on loopback).
        ``prefix`` separates groups sharing one store.
        """
        if size < 1:
            raise ValueError(f"ep_size: must be >= 1, got {size}")
        if not 0 <= rank < size:
            raise ValueError(f"ep_rank: must be in [0, {size}), got {rank}")
        dev = torch.device(device)
        if size == 1:
            return cls.single(dev)
        where = Rendezvous.parse(rendezvous) if isinstance(rendezvous, str) else rendezvous
        timeout = datetime.timedelta(seconds=join_timeout_s or timeout_s)
        try:
            store = dist.TCPStore(where.host, where.port, is_master=False, timeout=timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise GroupError(f"rank {rank}: cannot reach the rendezvous store at {where}: {exc}") from exc
        scoped = dist.PrefixStore(f"{prefix}/", store)
        group: CollectiveBackend
        if dev.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = cast(CollectiveBackend, dist.ProcessGroupNCCL(scoped, rank, size, options))
        else:
            gloo_options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            gloo_options._timeout = timeout
            gloo_options._devices = [dist.ProcessGroupGloo.create_device(hostname=interface_host or where.host)]
            group = cast(CollectiveBackend, dist.ProcessGroupGloo(scoped, rank, size, gloo_options))
        return cls(rank=rank, size=size, timeout_s=timeout_s, group=group, device=dev, _store=store)

    # ---- collectives (identity for EP=1) --------------------------------------------------------------

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (same length everywhere) -> [size][len(values)]."""
        mine = torch.tensor(list(values), dtype=torch.int64)
        if self.group is None:
            return [mine.tolist()]
        # gloo gathers host tensors; NCCL needs device tensors
        mine = mine.to(self.device)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        self._wait("all_gather", lambda g: g.allgather([out], [mine]))
        return [t.tolist() for t in out]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (returns ``tensor``)."""
        if self.group is not None:
            self._wait("all_reduce", lambda g: g.allreduce([tensor]))
        return tensor

    def all_to_all(
        self, output: torch.Tensor, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int]
    ) -> torch.Tensor:
        """Rows ``input_splits[r]`` of ``tensor`` go to rank r; ``output`` receives ``output_splits[r]`` rows from r."""
        if self.group is None:
            output.copy_(tensor)
            return output
        self._wait("all_to_all", lambda g: g.alltoall_base(output, tensor, output_splits, input_splits))
        return output

    def _wait(self, op: str, start: Callable[[CollectiveBackend], dist.Work]) -> None:
        if self._broken is not None:
            raise GroupError(f"rank {self.rank}: the expert-parallel group is broken ({self._broken})")
        if self.group is None:
            raise GroupError(f"rank {self.rank}: {op} on a context without a group")
        try:
            work = start(self.group)
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:  # gloo/NCCL report dead peers and timeouts as RuntimeError
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._broken = f"{op} failed: {first_line[:300]}"
            raise GroupError(
                f"rank {self.rank} of {self.size}: {op} failed, a peer rank is dead or stuck "
                f"(timeout {self.timeout_s:g}s): {first_line[:300]}"
            ) from exc

    @property
    def broken(self) -> str | None:
        """Why the group is unusable, or None."""
        return self._broken

    def abandon(self, reason: str) -> None:
        """Mark the group unusable and drop this rank's connections, so peers blocked in a collective
        with this rank fail now rather than at the timeout."""
        if self._broken is None:
            self._broken = reason
        if self.group is not None:
            try:
                self.group.shutdown()
            except RuntimeError:
                pass  # already torn down by the failure itself

    def close(self) -> None:
        """Leave the group (at exit). Later collectives raise ``GroupError``."""
        self.abandon("closed")
        self._store = None
