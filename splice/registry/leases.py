"""Claims a process holds on a registry for a while: a gc's lease (`gc/<uuid>.json`, a gc is running) and a push's
pending marker (`patches/<name>/pending/<n>.json`, version n is not published yet). See splice.registry.store,
"gc and push", for the protocol they serve.

Each claim carries its own expiry, written by its holder (a gc rewrites its lease every LEASE_REFRESH seconds
with an expiry LEASE_TTL ahead). A claim is over when its expiry has passed, when its holder is a dead process on
this machine, or when it claims to last longer than its kind's longest (a clock far ahead, or a hand-written
value): nothing a claim says can make a push wait longer than its `wait`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from splice.registry.backends import Backend
from splice.registry.layout import GC_DIR, located, this_host
from splice.registry.manifest import parse_model
from splice.registry.refs import RegistryError
from splice.tensors.partials import process_alive
from splice.values import FiniteFloat

LEASE_REFRESH = 30.0  # a running gc rewrites its lease this often (its heartbeat)
LEASE_TTL = 120.0  # each heartbeat claims this long ahead: a dead gc on another machine holds pushes this long
LEASE_LONGEST = 600.0  # a lease claiming to last longer than this from now is expired (a clock ahead, a bad file)
LEASE_POLL = (0.05, 1.0)  # a waiting push looks again after the first, backing off to the second (seconds)
DEFAULT_WAIT = 300.0  # how long a push waits for running gcs before it gives up (--wait)
LONGEST_WAIT = 3600.0  # the most --wait allows
SETTLE_MARGIN = 600.0  # a pending marker's expiry: the push's wait plus this (checking its blobs after the wait)
PUBLISH_MARGIN = 60.0  # a push publishes only while this much of its pending marker's time is left
CLOCK_SLACK = 300.0  # a pending marker may claim this much beyond the longest push, for a reader's clock behind

Pid = Annotated[int, Field(strict=True, ge=1, le=2**31 - 1)]


class Claim(BaseModel):
    """Who holds a claim and until when (time.time() seconds)."""

    model_config = ConfigDict(extra="allow")
    host: str
    pid: Pid
    started: FiniteFloat
    expires: FiniteFloat | None = None  # None: a lease written by a gc from before expiries (see `expiry`)

    def expiry(self) -> float:
        return self.expires if self.expires is not None else self.started + LEASE_TTL

    def over(self, now: float, longest: float) -> str | None:
        """Why nobody holds this claim any more, or None while it is held."""
        expiry = self.expiry()
        if expiry <= now:
            return f"it expired {now - expiry:.0f} s ago"
        if expiry - now > longest:
            return f"it claims to last {expiry - now:.0f} s more, longer than the {longest:.0f} s a claim may"
        if self.host == this_host() and not process_alive(self.pid):
            return f"process {self.pid} on this machine is gone"
        return None


class GcLease(Claim):
    """`gc/<uuid>.json`: a gc is running (a push waits for the ones it sees before checking its blobs)."""

    refreshed: FiniteFloat | None = None  # time.time() of its last heartbeat (None: written by a gc without one)

    def expiry(self) -> float:
        if self.expires is not None:
            return self.expires
        return (self.refreshed if self.refreshed is not None else self.started) + LEASE_TTL


class PendingPush(Claim):
    """`patches/<name>/pending/<n>.json`: version n's push has not confirmed its blobs yet; the version is not
    published until its pusher removes this file."""


ClaimT = TypeVar("ClaimT", bound=Claim)


def read_claim(backend: Backend, cls: type[ClaimT], rel: str, url: str) -> ClaimT:
    """A claim file, validated; a one-line RegistryError for one that does not validate (or is not a file).
    FileNotFoundError when it is gone (its holder finished)."""
    return parse_model(cls, backend.read_small(rel, url), located(url, rel))


def leases(backend: Backend, url: str) -> dict[str, GcLease | str]:
    """Every gc lease: rel -> the lease, or a line saying why it does not validate."""
    found: dict[str, GcLease | str] = {}
    for entry in backend.listdir(GC_DIR):
        rel = f"{GC_DIR}/{entry}"
        try:
            found[rel] = read_claim(backend, GcLease, rel, url)
        except FileNotFoundError:
            continue  # that gc just finished
        except RegistryError as exc:
            found[rel] = str(exc)
    return found


def held(lease: GcLease | str, now: float) -> bool:
    """Is this lease a running gc's? (one that does not validate is nobody's: it is reported and ignored)"""
    return not isinstance(lease, str) and lease.over(now, LEASE_LONGEST) is None


def check_wait(wait: float) -> float:
    if (
        isinstance(wait, bool)
        or not isinstance(wait, (int, float))
        or not math.isfinite(wait)
        or not 0 <= wait <= LONGEST_WAIT
    ):
        raise RegistryError(
            f"wait {wait!r} is not allowed: give the seconds a push may wait for running gcs, "
            f"0 to {LONGEST_WAIT:.0f} (`wait=SECONDS`)"
        )
    return float(wait)


@contextlib.contextmanager
def gc_lease(backend: Backend, url: str) -> Iterator[list[str]]:
    """Announce a gc (gc/<uuid>.json) for as long as it runs; then remove every lease that is over or does not
    validate. Yields a list that receives a line for each lease so removed."""
    rel = f"{GC_DIR}/{uuid.uuid4().hex}.json"
    started = time.time()
    lease = GcLease(host=this_host(), pid=os.getpid(), started=started, refreshed=started, expires=started + LEASE_TTL)
    backend.create(rel, (lease.model_dump_json() + "\n").encode())
    done = threading.Event()
    heartbeat = threading.Thread(target=_refresh_lease, args=(backend, rel, lease, done), daemon=True)
    heartbeat.start()
    removed: list[str] = []
    try:
        yield removed
    finally:
        done.set()
        heartbeat.join()
        backend.delete(rel)
    now = time.time()
    for other, found in leases(backend, url).items():
        why = found if isinstance(found, str) else found.over(now, LEASE_LONGEST)
        if why is not None:
            backend.remove_entry(other)
            removed.append(f"removed gc lease {located(url, other)}: {why}")


def _refresh_lease(backend: Backend, rel: str, lease: GcLease, done: threading.Event) -> None:
    """Rewrite the lease every LEASE_REFRESH seconds while the gc runs, so a long gc never looks dead to a
    waiting push. A failed rewrite is tried again at the next beat (the lease expires only after several)."""
    while not done.wait(LEASE_REFRESH):
        beat = time.time()
        renewed = lease.model_copy(update={"refreshed": beat, "expires": beat + LEASE_TTL})
        with contextlib.suppress(Exception):
            backend.put_many({rel: (renewed.model_dump_json() + "\n").encode()})


def wait_for_gcs(backend: Backend, url: str, wait: float) -> None:
    """Wait until every gc running now has finished (or its lease is over); a one-line RegistryError naming a
    lease still held after `wait` seconds. A gc that starts later lists the manifests after its lease exists,
    so it sees every version created before this call."""
    deadline = time.monotonic() + wait
    waiting = {rel for rel, lease in leases(backend, url).items() if held(lease, time.time())}
    pause, longest = LEASE_POLL
    while waiting:
        if time.monotonic() >= deadline:
            rel = sorted(waiting)[0]
            raise RegistryError(
                f"a gc still holds lease {located(url, rel)} after {wait:g} s of waiting; if no "
                "`splice registry gc` is running, remove that file (a gc removes leases once "
                "they expire), or push with a longer `wait`"
            )
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(longest, pause * 2)
        current = leases(backend, url)
        waiting = {rel for rel in waiting if rel in current and held(current[rel], time.time())}


def pending_claim(wait: float) -> PendingPush:
    """The pending marker of a push that will wait at most `wait` seconds for gcs."""
    started = time.time()
    return PendingPush(host=this_host(), pid=os.getpid(), started=started, expires=started + wait + SETTLE_MARGIN)


def pending_over(claim: PendingPush | str, now: float) -> str | None:
    """Why a pending marker's push is over (its version can be withdrawn), or None while it may still publish."""
    if isinstance(claim, str):
        return claim
    return claim.over(now, LONGEST_WAIT + SETTLE_MARGIN + CLOCK_SLACK)
