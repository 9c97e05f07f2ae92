"""Cases run in a worker process: onnxruntime can abort the whole process on a model a pass wrote (a C++
assertion is no Python exception, so no rollback can catch it), and a pass can hang. Either would end the
run with nothing learnt; in the worker it is one finding, and the next case gets a fresh worker.

The worker is spawned (not forked: the test process holds onnxruntime threads) once and serves cases over a
pipe; its stderr goes to a file, so the last line a dying runtime printed is part of the finding."""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from tests.fuzz.runner import Case, Outcome, run_case

CASE_TIMEOUT_S = 300.0  # far above any case's budget (each pass's time budgets are a few seconds here)


def _serve(conn: Any, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)  # the C++ runtime writes its last words to fd 2
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        conn.send(run_case(case))


class Worker:
    """``run(case)``: :func:`run_case` in the worker; a death or a hang comes back as the outcome's finding."""

    def __init__(self, timeout: float = CASE_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Any = None
        self._log = Path(tempfile.mkstemp(prefix="graphopt-fuzz-worker-", suffix=".log")[1])

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child, str(self._log)), daemon=True)
        self._process.start()
        child.close()
        self._conn = parent

    def _last_words(self) -> str:
        lines = [line.strip() for line in self._log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][-300:] if lines else "nothing on stderr"

    def run(self, case: Case) -> Outcome:
        if self._process is None or not self._process.is_alive():
            self._start()
        self._log.write_text("")
        self._conn.send(case)
        if self._conn.poll(self.timeout):
            try:
                return self._conn.recv()
            except EOFError:  # the worker died
                self._process.join(10)
                code = self._process.exitcode
                how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit {code}"
                return Outcome(finding=f"the process died ({how}) running {case.recipe}: {self._last_words()}")
        self.close()
        return Outcome(finding=f"no result after {self.timeout:.0f} s running {case.recipe} (killed)")

    def close(self) -> None:
        if self._process is not None:
            self._conn.close()
            self._process.kill()
            self._process.join(10)
            self._process = None

    def __del__(self) -> None:
        self._log.unlink(missing_ok=True)
