"""Where `graphopt auto` runs its candidates: in this process, or on Dask workers.

``workers`` > 1 starts a Dask LocalCluster of that many worker processes (one thread each, nothing to start by
hand); ``scheduler`` connects to an existing cluster (``dask scheduler`` plus ``dask worker ADDR``). Size
searches keep every worker busy: a new candidate starts as soon as one finishes. A latency or balanced search
times its candidates, and a latency measured while other work runs on the machine is wrong: its candidates run
one at a time, each on a worker that carries a ``timing`` resource (``dask worker ADDR --resources timing=1`` on
the machine the model will run on; every local worker has one). Pruned channel widths follow the NCHWc block
of the machines that time the candidates (``channel_block``), not the one auto runs on.

``wait_any`` takes the seconds the search has left: a candidate still running when they are spent is stopped
(in this process by an interval timer, on Dask by cancelling its future), so the time budget is the search's
wall time, not the time to start its last candidate.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Sequence

from graphopt import cpu
from graphopt.auto import candidate
from graphopt.errors import GraphoptError


class Inline:
    """Candidates one after the other, in this process: a job runs when it is waited for."""

    slots = 1
    where = "this process"

    @property
    def channel_block(self) -> int:
        return _host_channel_block()

    def start(self, job: candidate.Job) -> candidate.Job:
        return job

    def wait_any(self, handles: Sequence[Any], seconds: float | None = None) -> list[tuple[Any, candidate.Candidate]]:
        """The first job run to its end (nothing: it was stopped when ``seconds`` ran out)."""
        cand = run_until(handles[0], seconds)
        return [] if cand is None else [(handles[0], cand)]

    def cancel(self, handles: Sequence[Any]) -> None:
        pass

    def close(self) -> None:
        pass


class DaskWorkers:
    """Candidates on Dask workers: a LocalCluster of ``workers`` processes, or the cluster at ``scheduler``."""

    def __init__(self, workers: int | None, scheduler: str | None, timed: bool) -> None:
        from distributed import Client, LocalCluster

        self.cluster, self.closed = None, False
        try:
            if scheduler:
                self.client = Client(scheduler, timeout="20s")
            else:
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None, resources={"timing": 1})
                self.client = Client(self.cluster)
        except (OSError, TimeoutError) as err:
            raise GraphoptError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({err})") from None
        info = self.client.scheduler_info()["workers"]
        if not info:
            raise GraphoptError(f"--scheduler {scheduler}: the cluster has no workers")
        timers = [address for address, w in info.items() if w.get("resources", {}).get("timing")]
        if timed and not timers:
            raise GraphoptError("a latency or balanced search needs a worker with a 'timing' resource "
                                "(dask worker ADDR --resources timing=1)")
        self.timed = timed
        blocks = self.client.run(_host_channel_block)
        self.channel_block = widest_block(blocks, timers if timed else list(info))
        self.slots = 1 if timed else len(info)
        self.where = f"{len(info)} Dask worker(s)" + (f", {len(timers)} with a timing resource" if timed else "")

    def start(self, job: candidate.Job) -> Any:
        """A Dask future of the candidate: the job runs on whichever worker is free (one with a timing resource
        when the search times candidates)."""
        return self.client.submit(candidate.run, job, pure=False, resources={"timing": 1} if self.timed else None)

    def wait_any(self, handles: Sequence[Any], seconds: float | None = None) -> list[tuple[Any, candidate.Candidate]]:
        """The finished ones among ``handles`` with their candidates: waits for one, at most ``seconds``."""
        from distributed import wait

        try:
            done = wait(list(handles), timeout=seconds, return_when="FIRST_COMPLETED").done
        except TimeoutError:  # distributed raises the builtin (asyncio's is the same class since 3.11)
            return []
        return [(f, f.result()) for f in handles if f in done]

    def cancel(self, handles: Sequence[Any]) -> None:
        """Cancel the futures at the search's end. A cancelled task still runs to its end on its worker, so a
        local cluster is closed too: nothing it runs may disturb the latency judged next on this machine."""
        self.client.cancel(list(handles))
        if handles and self.cluster is not None:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


class _TimeUp(BaseException):
    """Raised inside a candidate run by the interval timer (a BaseException: a candidate's own ``except
    Exception`` must not take it for a failed recipe)."""


def run_until(job: candidate.Job, seconds: float | None) -> candidate.Candidate | None:
    """:func:`candidate.run`, stopped after ``seconds`` (None: the candidate did not finish in time). Without
    a timer (not the main thread, or no SIGALRM, as on Windows) the candidate runs to its end."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return candidate.run(job)
    if seconds <= 0:
        return None
    armed = [True]

    def ring(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _TimeUp

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        cand = candidate.run(job)
        armed[0] = False
        return cand
    except _TimeUp:
        return None
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _host_channel_block() -> int:
    return cpu.host().channel_block


def widest_block(blocks: dict[str, int], workers: Sequence[str]) -> int:
    """The channel block for candidates that may run on any of ``workers`` (address → its block): the widest,
    a multiple of the others (8 and 16: a width on 16 is on 8 too)."""
    return max((blocks[w] for w in workers if w in blocks), default=cpu.host().channel_block)


def executor(workers: int | None, scheduler: str | None, timed: bool) -> Inline | DaskWorkers:
    if workers is not None and workers < 1:
        raise GraphoptError(f"--workers {workers}: expected at least 1")
    if scheduler is None and (workers or 1) == 1:
        return Inline()
    return DaskWorkers(workers, scheduler, timed)
