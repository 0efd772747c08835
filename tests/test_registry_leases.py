"""gc leases that never go stale (issue 16, item 4): a lease carries its own expiry, bounded; one that does not
validate is ignored by push and removed by gc; a push waits at most --wait seconds, then fails in one line
naming the lease, and publishes nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_registry import make_patch

from splice.registry import Registry, RegistryError, leases
from splice.registry.layout import this_host

from helpers import run_cli

NOW = object()  # stands for time.time() when the lease is written


def _write_lease(url: str, name: str, body) -> Path:
    path = Path(url, "gc", name)
    path.parent.mkdir(exist_ok=True)
    if body == "directory":
        (path / "inside").mkdir(parents=True)
    else:
        path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def _other_host(**fields) -> dict:
    now = time.time()
    return {
        "host": "another-machine",
        "pid": 4242,
        "started": now,
        **{k: (now if v is NOW else v) for k, v in fields.items()},
    }


BAD_LEASES = {
    "refreshed Infinity": '{"host": "another-machine", "pid": 4242, "started": 1.0, "refreshed": Infinity}',
    "expires Infinity": '{"host": "another-machine", "pid": 4242, "started": 1.0, "expires": Infinity}',
    "refreshed NaN": '{"host": "another-machine", "pid": 4242, "started": 1.0, "refreshed": NaN}',
    "started in the future": _other_host(started=time.time() + 10**7),
    "refreshed in the future": _other_host(refreshed=time.time() + 3 * 3600),
    "expires in the future": _other_host(expires=time.time() + 10**6),
    "not JSON": "{truncated",
    "a pid of 0": {"host": this_host(), "pid": 0, "started": 1.0},
    "a directory": "directory",
}


@pytest.mark.parametrize("case", list(BAD_LEASES))
def test_a_lease_that_claims_too_much_or_does_not_validate_never_holds_a_push_and_gc_removes_it(
    tmp_path, monkeypatch, capsys, case
):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    lease = _write_lease(url, "bad.json", BAD_LEASES[case])
    began = time.monotonic()
    pushed = registry.push("x", make_patch(1), wait=30).manifest
    took = time.monotonic() - began
    assert took < 5, took  # not held by it (before: Infinity and future leases held every push forever)
    assert Registry.open(url).resolve("x").version == pushed.version
    code, out, err = run_cli(["registry", "gc", "--registry", url], monkeypatch, capsys)
    assert code == 0, err
    assert not lease.exists() and not lease.is_symlink()
    said = "".join(out.split())  # rich wraps long lines
    assert "".join(f"removed gc lease {url}/gc/bad.json:".split()) in said, out
    print(f"\nLEASE {case}: push took {took:.2f} s and published {pushed.ref}; gc: {said.split('bad.json:')[-1]}")


def test_a_held_lease_makes_a_push_fail_after_wait_naming_it_and_publishing_nothing(tmp_path, monkeypatch, capsys):
    url = str(tmp_path / "registry")
    Registry.init(url)
    patch = make_patch(2).save(tmp_path / "patch")
    _write_lease(url, "busy.json", _other_host(expires=time.time() + 300))  # a gc on another machine, running
    began = time.monotonic()
    code, out, err = run_cli(["registry", "push", "x", patch, "--wait", "1", "--registry", url], monkeypatch, capsys)
    took = time.monotonic() - began
    assert code == 2 and out == "", (out, err)
    (line,) = err.strip().splitlines()
    assert line.startswith("error: a gc still holds lease ") and f"{url}/gc/busy.json" in line, line
    assert "remove that file" in line and "--wait" in line and "x@1 was withdrawn" in line, line
    assert 1 <= took < 10, took
    store = Registry.open(url)
    assert store.versions("x") == [] and store.latest_version("x") is None
    with pytest.raises(RegistryError, match="x@1 was removed"):
        store.resolve("x@1")
    print(f"\nLEASE held by a live gc elsewhere: push --wait 1 failed after {took:.2f} s: {line}")


def test_wait_0_gives_up_at_once_and_bad_waits_are_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    _write_lease(url, "busy.json", _other_host(expires=time.time() + 300))
    with pytest.raises(RegistryError, match="a gc still holds lease .*busy.json after 0 s"):
        registry.push("x", make_patch(3), wait=0)
    blobs_before = sorted(p.name for p in Path(url, "blobs").rglob("*") if p.is_file())
    for bad in (-1, float("inf"), float("nan"), 3601, True):
        with pytest.raises(RegistryError, match="wait .* is not allowed"):
            registry.push("x", make_patch(4), wait=bad)
    code, _, err = run_cli(["registry", "push", "x", tmp_path, "--wait", "-5", "--registry", url], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--wait SECONDS" in err
    assert sorted(p.name for p in Path(url, "blobs").rglob("*") if p.is_file()) == blobs_before


def test_a_dead_gc_on_another_machine_holds_pushes_only_until_its_lease_expires(tmp_path):
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    _write_lease(url, "dead.json", _other_host(expires=time.time() + 1.5))  # its heartbeat stopped
    began = time.monotonic()
    registry.push("x", make_patch(5))
    assert 1.0 <= time.monotonic() - began < 6
    assert leases.LEASE_TTL <= 120 and leases.DEFAULT_WAIT <= 300  # the longest a dead gc holds a push, default


def test_a_running_gc_writes_an_expiry_within_the_bound(tmp_path):
    registry = Registry.init(str(tmp_path / "registry"))
    with leases.gc_lease(registry._backend, registry.url):
        (lease,) = leases.leases(registry._backend, registry.url).values()
        assert lease.host == this_host() and lease.expires is not None
        assert 0 < lease.expires - time.time() <= leases.LEASE_TTL <= leases.LEASE_LONGEST
        assert leases.held(lease, time.time())


def test_a_gc_whose_clock_is_a_little_behind_never_withdraws_a_push_waiting_its_longest(tmp_path, monkeypatch):
    """A push with --wait 3600 writes a pending marker exactly as long as a marker may claim; a gc on a machine
    whose clock is 2 s behind took it for one that claims too long and withdrew the push in flight."""
    from splice.registry import maintenance, store

    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    real_time = time.time
    wait = store.wait_for_gcs

    class Behind:  # the gc's machine: its clock 2 s behind the pusher's
        strftime, gmtime = time.strftime, time.gmtime

        @staticmethod
        def time():
            return real_time() - 2.0

    def gc_from_a_machine_behind(*args):
        with monkeypatch.context() as patched:
            patched.setattr(maintenance, "time", Behind)
            report = Registry.open(url).gc(grace_seconds=0)
        assert report.pending_withdrawn == [] and len(report.pending_kept) == 1, report
        wait(*args)

    monkeypatch.setattr(store, "wait_for_gcs", gc_from_a_machine_behind)
    pushed = registry.push("x", make_patch(61), wait=leases.LONGEST_WAIT).manifest
    assert pushed.version == 1 and [m.version for m in Registry.open(url).versions("x")] == [1]
