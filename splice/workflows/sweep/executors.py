"""Where a sweep's candidates run: in the driver's own process (one local worker), in a local process pool, or as
Ray tasks on a cluster. Each executor takes candidates with `submit` and gives back outcomes with `next_outcome`, a
wait with a bound; a candidate whose worker dies is run again (a bounded number of times) and still comes back
once, and a candidate that runs past the sweep's timeout comes back failed."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

from splice.errors import SpliceError, parameter
from splice.workflows.sweep.candidate import Candidate, Evaluator, Outcome, evaluate, forget_sweep

WORKER_RETRIES = 2  # a candidate whose worker dies is run again at most this many times (Ray's max_retries alike)


class Executor(Protocol):
    slots: int  # how many candidates run at once

    def submit(self, candidate: Candidate) -> None: ...

    def next_outcome(self, timeout: float) -> Outcome | None:
        """The next finished candidate's outcome, or None when none finished within `timeout` seconds."""
        ...

    def close(self) -> None: ...


class InlineExecutor:
    """One worker: each candidate runs in the driver's own process, when its outcome is asked for."""

    slots = 1

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.queue: deque[Candidate] = deque()

    def submit(self, candidate: Candidate) -> None:
        self.queue.append(candidate)

    def next_outcome(self, timeout: float) -> Outcome | None:
        return evaluate(self.queue.popleft(), self.evaluator) if self.queue else None

    def close(self) -> None:
        self.queue.clear()
        forget_sweep()  # a pool's or Ray's workers end with the sweep; this process goes on


@dataclass
class _Running:
    candidate: Candidate
    started: float
    attempts: int = 1


def _start_worker(workers: int) -> None:
    """A pool worker leaves Ctrl-C to the driver, which stops the pool (the terminal sends it to every process), and
    takes its share of the cores."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _share_cores(workers)


def _died(candidate: Candidate, attempts: int) -> Outcome:
    return Outcome(
        candidate.number,
        None,
        f"its worker died {attempts} times (killed, out of memory, or it could not start: a script that calls "
        "splice.sweep must call it under `if __name__ == '__main__':`); the candidate was not evaluated",
    )


def _timed_out(candidate: Candidate, timeout: float) -> Outcome:
    return Outcome(candidate.number, None, f"still running after the sweep's timeout of {timeout:g} s; stopped")


class PoolExecutor:
    """`workers` local processes (forked from a server that imported splice once, so a worker starts in a moment).
    A worker that dies takes the pool with it: the pool is rebuilt and the candidates it held are run again."""

    def __init__(self, evaluator: Evaluator, workers: int, candidate_timeout: float):
        self.evaluator = evaluator
        self.slots = workers
        self.timeout = candidate_timeout
        self.running: dict[concurrent.futures.Future, _Running] = {}
        self.pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["splice.workflows.sweep.candidate"])
        return concurrent.futures.ProcessPoolExecutor(
            self.slots, mp_context=context, initializer=_start_worker, initargs=(self.slots,)
        )

    def submit(self, candidate: Candidate, attempts: int = 1) -> None:
        future = self.pool.submit(evaluate, candidate, self.evaluator)
        self.running[future] = _Running(candidate, time.monotonic(), attempts)

    def next_outcome(self, timeout: float) -> Outcome | None:
        if not self.running:
            return None
        done, _ = concurrent.futures.wait(
            list(self.running), timeout=min(timeout, self._time_left()), return_when="FIRST_COMPLETED"
        )
        for future in done:
            running = self.running.pop(future)
            try:
                return future.result()
            except BrokenProcessPool:
                return self._restart(lost=running)
        overdue = [f for f, r in self.running.items() if time.monotonic() - r.started > self.timeout]
        if overdue:
            stopped = self.running.pop(overdue[0])
            self._restart(lost=None)
            return _timed_out(stopped.candidate, self.timeout)
        return None

    def _time_left(self) -> float:
        oldest = min(r.started for r in self.running.values())
        return max(0.0, self.timeout - (time.monotonic() - oldest)) + 0.01

    def _restart(self, lost: _Running | None) -> Outcome | None:
        """A new pool; what the old one still held is submitted again (a lost candidate's attempt is counted, and
        once it has died too often it comes back failed)."""
        held = list(self.running.values())
        self.running.clear()
        self._stop(self.pool)
        self.pool = self._new_pool()
        for running in held:
            self.submit(running.candidate, running.attempts)
        if lost is None:
            return None
        if lost.attempts > WORKER_RETRIES:
            return _died(lost.candidate, lost.attempts)
        self.submit(lost.candidate, lost.attempts + 1)
        return None

    @staticmethod
    def _stop(pool: concurrent.futures.ProcessPoolExecutor) -> None:
        processes = list(getattr(pool, "_processes", {}).values())  # terminate: shutdown alone waits for them
        for process in processes:
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=10)

    def close(self) -> None:
        self._stop(self.pool)
        self.running.clear()


def _share_cores(workers: int) -> None:
    """A pool worker's torch threads: its share of the cores, unless OMP_NUM_THREADS says (as Ray's workers get).
    With torch's default, each of `workers` processes runs a thread per core, and threads that outnumber the cores
    wait on each other: on 2 cores, 2 workers x 2 threads took 8-9 s a TIES candidate instead of 2 s, and the sweep
    took 2.7x as long as on 1 worker (benchmarks/sweep_bench.py)."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


RAY_CONNECT_SECONDS = 60.0
# a Ray client server starts a server process per session; on a loaded head that start can fail once and then work
RAY_INIT_ATTEMPTS = 2
RAY_INIT_RETRY_SECONDS = 2.0
RAY_REACH_SECONDS = 10.0  # ray.init retries an address where nothing answers for many minutes: a socket answers first


@dataclass(frozen=True)
class TaskResources:
    """What one candidate asks of a Ray node: Ray places no more candidates on a node than these fit."""

    num_cpus: float
    num_gpus: float
    memory: int  # bytes

    def options(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "memory": max(self.memory, 1)}


class RayExecutor:
    """Candidates as Ray tasks with declared resources, retried by Ray when a worker dies (the outcome still
    comes back once). `address`: a running cluster (`HOST:PORT`, `ray://HOST:PORT`, `auto`), or None for a
    cluster started in this process."""

    def __init__(
        self,
        evaluator: Evaluator,
        address: str | None,
        workers: int | None,
        resources: Callable[[dict[str, float]], TaskResources],
        candidate_timeout: float,
    ):
        ray = _import_ray()
        self.ray = ray
        self.started_here = not ray.is_initialized()
        if self.started_here:
            _connect(ray, address)
        try:
            cluster = ray.cluster_resources()
            self.resources = resources(cluster)
        except BaseException:  # refused before any trial: leave no connection behind for the next sweep
            if self.started_here:
                ray.shutdown()
            raise
        fitting = int(cluster.get("CPU", 1) // max(self.resources.num_cpus, 1e-9))
        self.slots = max(1, workers or fitting)
        self.timeout = candidate_timeout
        self.task = ray.remote(max_retries=WORKER_RETRIES, retry_exceptions=False)(evaluate)
        self.evaluator_ref = ray.put(evaluator)
        self.running: dict[Any, tuple[Candidate, float]] = {}

    def submit(self, candidate: Candidate) -> None:
        ref = self.task.options(**self.resources.options()).remote(candidate, self.evaluator_ref)
        self.running[ref] = (candidate, time.monotonic())

    def next_outcome(self, timeout: float) -> Outcome | None:
        if not self.running:
            return None
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
        for ref in ready:
            candidate, _started = self.running.pop(ref)
            try:
                return self.ray.get(ref, timeout=RAY_CONNECT_SECONDS)
            except self.ray.exceptions.RayError as exc:  # out of retries, or the task could not be placed
                return Outcome(candidate.number, None, f"Ray could not run it: {type(exc).__name__}")
        for ref, (candidate, started) in list(self.running.items()):
            if time.monotonic() - started > self.timeout:
                self.ray.cancel(ref, force=True)
                del self.running[ref]
                return _timed_out(candidate, self.timeout)
        return None

    def close(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref, force=True)
        self.running.clear()
        if self.started_here:
            self.ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SpliceError("the ray executor needs Ray: pip install 'splice[ray]'") from None
    return ray


def _connect(ray: Any, address: str | None) -> None:
    """Join the cluster at `address` (or start one here when None), or a one-line error before any trial."""
    import logging

    if address is not None:
        _check_reachable(address)
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(_import_roots())}}
    for attempt in range(1, RAY_INIT_ATTEMPTS + 1):
        try:
            ray.init(
                # "local": a cluster of its own, where None would join whatever RAY_ADDRESS or the last `ray start`
                # on this machine names (a stopped one too, retried for many minutes)
                address=address if address is not None else "local",
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
                log_to_driver=False,
                include_dashboard=False,
                configure_logging=True,
            )
            return
        except ConnectionAbortedError as exc:  # a client server that could not start this session's server process
            if attempt == RAY_INIT_ATTEMPTS:
                raise _unreachable(address, _server_reason(exc)) from None
            time.sleep(RAY_INIT_RETRY_SECONDS)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            raise _unreachable(address, _first(exc)) from None


def _unreachable(address: str | None, why: str) -> SpliceError:
    return SpliceError(f"{parameter('address')} {address}: cannot reach a Ray cluster there ({why})")


def _check_reachable(address: str) -> None:
    """A one-line error within RAY_REACH_SECONDS when nothing answers at HOST:PORT (`ray://HOST:PORT` alike);
    `auto` and the like are left to Ray, which finds the cluster itself."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_REACH_SECONDS).close()
    except OSError as exc:
        raise _unreachable(address, exc.strerror or _first(exc)) from None


def _server_reason(error: BaseException) -> str:
    """The last line of the traceback a Ray client server sends back ("Initialization failure from server:" first)."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    return text[-1] if text else type(error).__name__


def _first(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _import_roots() -> list[str]:
    """Where this process imports splice (and a hook's modules) from, so a worker on this machine imports the same."""
    import splice

    root = os.path.dirname(os.path.dirname(os.path.abspath(splice.__file__)))
    return [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]


def local_workers(workers: int | None) -> int:
    count = workers if workers is not None else (os.cpu_count() or 1)
    if count < 1:
        raise SpliceError(f"`workers` must be at least 1, got {count}")
    return count
