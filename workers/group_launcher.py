"""``launch_group``: start an expert-parallel group as ``k2serve worker`` processes on this host.

Lifecycle: the launcher hosts the group's ``TCPStore`` on loopback (port chosen by the OS, so no
race for a free port), writes each rank's request file, starts one ``python -m k2serve worker``
per rank in ``workdir`` (a neutral working directory, one intra-op thread each), and returns a
``LaunchedGroup``. ``wait`` bounds the whole run and kills every rank it left running;
``kill(rank)`` sends SIGKILL to one rank (fault tests). Results are each rank's delta JSONL,
``--stats`` JSON and ``--metrics`` text in ``workdir``. For tests and benchmarks; Ray pools
launch ranks in the cluster layer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from k2serve.workers.parallel import host_store


@dataclass
class LaunchedGroup:
    workdir: Path
    procs: list[subprocess.Popen[bytes]]
    store: dist.TCPStore

    @property
    def size(self) -> int:
        return len(self.procs)

    def output_path(self, rank: int) -> Path:
        return self.workdir / f"rank{rank}.out.jsonl"

    def stats_path(self, rank: int) -> Path:
        return self.workdir / f"rank{rank}.stats.json"

    def metrics_path(self, rank: int) -> Path:
        return self.workdir / f"rank{rank}.metrics.txt"

    def log_path(self, rank: int) -> Path:
        return self.workdir / f"rank{rank}.log"

    def records(self, rank: int) -> list[dict[str, Any]]:
        """The token-delta records rank ``rank`` has written so far."""
        path = self.output_path(rank)
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def stats(self, rank: int) -> dict[str, Any]:
        return dict(json.loads(self.stats_path(rank).read_text()))

    def kill(self, rank: int) -> None:
        self.procs[rank].send_signal(signal.SIGKILL)

    def wait(self, timeout_s: float) -> list[int]:
        """Exit codes of every rank; ranks still running after ``timeout_s`` are killed (code -9)."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        self.terminate()
        return [int(p.returncode) for p in self.procs]

    def terminate(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def log(self, rank: int) -> str:
        return self.log_path(rank).read_text(errors="replace")


def tokens_by_request(records: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Concatenate the deltas of each request id (choice 0)."""
    out: dict[str, list[int]] = {}
    for record in records:
        if record.get("index", 0) == 0:
            out.setdefault(record["request_id"], []).extend(record["new_token_ids"])
    return out


def launch_group(
    model_dir: str | Path,
    requests_per_rank: Sequence[Sequence[Mapping[str, Any]]],
    workdir: str | Path,
    *,
    worker_args: Sequence[str] = (),
    timeout_s: float = 20.0,
    env: Mapping[str, str] | None = None,
) -> LaunchedGroup:
    """One process per entry of ``requests_per_rank`` (EP size = its length)."""
    size = len(requests_per_rank)
    if size < 1:
        raise ValueError("requests_per_rank: need at least one rank")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = host_store("127.0.0.1", timeout_s=timeout_s)
    child_env = dict(os.environ) | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | dict(env or {})
    procs: list[subprocess.Popen[bytes]] = []
    group = LaunchedGroup(work, procs, store)
    for rank, requests in enumerate(requests_per_rank):
        request_file = work / f"rank{rank}.requests.jsonl"
        request_file.write_text("".join(json.dumps(dict(r)) + "\n" for r in requests))
        command = [
            sys.executable,
            "-m",
            "k2serve",
            "worker",
            "--model",
            str(Path(model_dir).resolve()),
            "--ep-size",
            str(size),
            "--ep-rank",
            str(rank),
            "--rendezvous",
            f"127.0.0.1:{store.port}",
            "--timeout",
            str(timeout_s),
            "--requests",
            str(request_file),
            "--output",
            str(group.output_path(rank)),
            "--stats",
            str(group.stats_path(rank)),
            "--metrics",
            str(group.metrics_path(rank)),
            *worker_args,
        ]
        with group.log_path(rank).open("wb") as log:
            procs.append(subprocess.Popen(command, cwd=work, env=child_env, stdout=log, stderr=subprocess.STDOUT))
    return group
