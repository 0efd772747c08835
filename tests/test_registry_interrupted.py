"""Pushes interrupted by real signals (SIGINT, SIGKILL) at each step of the push protocol, with and without a
concurrent `registry gc --grace 0` (issue 16, item 3): whatever the push printed must be true, and what
`registry ls/verify/gc/deploy` say afterwards must be true: no broken version is ever listed, a version is
published only once its blobs are confirmed, and version numbers never repeat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import splice
from splice.adapters.extract import extract_patch
from splice.registry import Registry
from splice.registry.layout import this_host

from helpers import run_cli, wait_for_marker

ENV = {**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1]), "COLUMNS": "250"}

# `splice ARGV...` that stops at one step of the push protocol (touching a marker) until it is signalled.
PUSH = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from splice.registry import store, transfer

    marker, step = Path(sys.argv[1]), sys.argv[2]
    waiter = store if hasattr(store, "wait_for_gcs") else store.maintenance  # where the wait for gcs lives

    def hold():
        marker.touch()
        time.sleep(300)

    def wrap(owner, attr, first=False, then=True):
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            if first:
                hold() if then else marker.touch()
            out = original(*args, **kwargs)
            if not first:
                hold()
            return out
        setattr(owner, attr, wrapped)

    if step == "blobs written":
        wrap(transfer.TensorPusher, "push")  # every blob stored, no version number taken yet
    elif step == "manifest created":
        wrap(store.Registry, "_create_version")
    elif step == "waiting for gc":
        wrap(waiter, "wait_for_gcs", first=True, then=False)  # a gc's lease is held: the push waits in there
    elif step == "checking blobs":
        wrap(waiter, "wait_for_gcs")  # the wait is over; the blobs are checked next
    elif step == "moving alias":
        wrap(store.Registry, "tag", first=True)
    sys.argv = ["splice", *sys.argv[3:]]
    from splice.cli.app import main
    main()
""")

# `splice registry gc --grace 0 ...` that stops once it has listed the versions, until a `go` file appears.
SLOW_GC = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from splice.registry import maintenance

    listed, go = Path(sys.argv[1]), Path(sys.argv[2])
    gc = maintenance.gc

    def slow_gc(*args):
        args = list(args)
        at = next(i for i, a in enumerate(args) if callable(a))
        live = args[at]

        def listed_then_wait():
            found = live()
            listed.touch()
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return found
        args[at] = listed_then_wait
        return gc(*args)

    maintenance.gc = slow_gc
    sys.argv = ["splice", *sys.argv[3:]]
    from splice.cli.app import main
    main()
""")

STEPS = ["blobs written", "manifest created", "waiting for gc", "checking blobs", "moving alias"]
FIGURES: list[dict] = []


@pytest.fixture(scope="module")
def patch_and_base(tmp_path_factory):
    from conftest import perturbed, save, tiny_model

    root = tmp_path_factory.mktemp("interrupted")
    model = tiny_model("bert", 0)
    base = save(model, root / "base", False)
    tuned = save(perturbed(model, 1), root / "tuned", False)
    patch = extract_patch(base, tuned, "delta").save(root / "patch")
    return Path(patch), base


def _start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, out, err


def _hold_a_lease(url: str) -> Path:
    """A gc lease held by this (live) process, so a push waits for it."""
    lease = Path(url, "gc", "held-by-the-test.json")
    lease.parent.mkdir(exist_ok=True)
    now = time.time()
    lease.write_text(json.dumps({"host": this_host(), "pid": os.getpid(), "started": now, "expires": now + 300}))
    return lease


def _interrupt(url: str, patch: Path, step: str, sig: signal.Signals, gc: bool, tmp: Path) -> tuple[int, str]:
    """Run the push, stop it at `step` and send `sig`; with `gc`, a `registry gc --grace 0` races it: one that
    listed the versions before the push created its manifest and removes blobs while it stands at the step (up to
    waiting for gc), or one run start to finish while it stands there (after the wait)."""
    marker, listed, go = tmp / f"{step}.at", tmp / f"{step}.listed", tmp / f"{step}.go"
    collector = lease = None
    early_gc = gc and STEPS.index(step) <= STEPS.index("waiting for gc")
    if early_gc:
        collector = _start(SLOW_GC, listed, go, "registry", "gc", "--grace", "0", "--registry", url, "-q")
        wait_for_marker(collector, listed)
    elif step == "waiting for gc":
        lease = _hold_a_lease(url)
    pusher = _start(PUSH, marker, step, "registry", "push", "x", patch, "--alias", "prod", "--registry", url)
    wait_for_marker(pusher, marker)
    time.sleep(0.2)
    if early_gc and step != "waiting for gc":
        go.touch()  # the gc removes what it listed as unused (the blobs this push reuses) while the push stands
        assert _finish(collector)[0] == 0
    elif gc and not early_gc:
        assert subprocess.run([sys.executable, "-m", "splice", "registry", "gc", "--grace", "0", "--registry", url,
                               "-q"], env=ENV, capture_output=True, timeout=120).returncode == 0
    pusher.send_signal(sig)
    code, _, err = _finish(pusher)
    if early_gc and step == "waiting for gc":
        go.touch()  # the gc the push was waiting for removes the blobs after the push is gone
        assert _finish(collector)[0] == 0
    if lease is not None:
        lease.unlink()
    return code, err


def _ls_versions(url: str) -> list[int]:
    return [m.version for m in Registry.open(url).versions("x")]


@pytest.mark.parametrize("gc", [False, True], ids=["no-gc", "gc-grace-0"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("step", STEPS)
def test_an_interrupted_push_publishes_nothing_broken_and_says_what_is_true(patch_and_base, tmp_path, monkeypatch,
                                                                            capsys, step, sig, gc):
    patch, base = patch_and_base
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    registry.push("x", patch)
    registry.remove("x@1")  # its blobs are unused now: the push below reuses them, a gc at grace 0 removes them

    code, err = _interrupt(url, patch, step, sig, gc, tmp_path)
    said = err.strip().splitlines()[-1] if err.strip() else ""
    listed = _ls_versions(url)

    # what the push said is true
    if sig == signal.SIGINT:
        assert code == 130, err
        assert "Traceback" not in err, err
        if said == "interrupted; nothing was published":
            assert listed == [], (step, listed)
        else:
            assert step == "moving alias" and "x@2 was published" in said, said
            assert listed == [2]
    else:
        assert code == -signal.SIGKILL
    if step != "moving alias":
        assert listed == [], (step, sig, gc, listed)  # never confirmed, so never published

    # what ls, verify, deploy and gc say afterwards is true
    c_ls, out_ls, _ = run_cli(["registry", "ls", "x", "--registry", url], monkeypatch, capsys)
    c_verify, out_verify, err_verify = run_cli(["registry", "verify", "--registry", url], monkeypatch, capsys)
    c_deploy, _, err_deploy = run_cli(["deploy", "x", "--base", base, "--out", tmp_path / "deployed",
                                       "--registry", url], monkeypatch, capsys)
    c_gc, out_gc, err_gc = run_cli(["registry", "gc", "--registry", url], monkeypatch, capsys)
    assert c_ls == 0 and c_gc == 0, (out_ls, err_gc)
    assert c_verify == 0, out_verify + err_verify  # every listed version's blobs are there
    if listed:
        assert c_deploy == 0, err_deploy
        prod = Registry.open(url).aliases("x").get("prod")
        assert (prod is None) == ("not moved" in said or sig == signal.SIGKILL), said
        assert prod is None or prod.version == 2
    else:
        assert c_deploy == 2 and len(err_deploy.strip().splitlines()) == 1, err_deploy
        assert not (tmp_path / "deployed").exists()
    assert _ls_versions(url) == listed
    assert not list(Path(url, "patches", "x", "pending").glob("*")), "gc withdraws a push that is over"
    taken = {int(p.stem) for d in ("versions", "removed") for p in Path(url, "patches", "x", d).glob("*.json")}
    again = Registry.open(url).push("x", patch)  # numbers never repeat; the push after it works
    assert again.version == max(taken) + 1 and Registry.open(url).verify().ok
    FIGURES.append({"step": step, "signal": sig.name, "gc": gc, "exit": code, "said": said, "listed": listed,
                    "verify": c_verify, "deploy": c_deploy, "gc_says": [line for line in out_gc.splitlines()
                                                                        if "withdrew" in line]})
    print("\nFIGURE " + json.dumps(FIGURES[-1]))
