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
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


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
        assert (
            subprocess.run(
                [sys.executable, "-m", "splice", "registry", "gc", "--grace", "0", "--registry", url, "-q"],
                env=ENV,
                capture_output=True,
                timeout=120,
            ).returncode
            == 0
        )
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
def test_an_interrupted_push_publishes_nothing_broken_and_says_what_is_true(
    patch_and_base, tmp_path, monkeypatch, capsys, step, sig, gc
):
    patch, base = patch_and_base
    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    registry.push("x", patch)
    registry.remove("x@1")  # its blobs are unused now: the push below reuses them, a gc at grace 0 removes them

    code, err = _interrupt(url, patch, step, sig, gc, tmp_path)
    said = err.strip().splitlines()[-1] if err.strip() else ""
    listed = _ls_versions(url)
    # what ls, verify, deploy and gc say afterwards
    c_ls, out_ls, _ = run_cli(["registry", "ls", "x", "--registry", url], monkeypatch, capsys)
    c_verify, out_verify, err_verify = run_cli(["registry", "verify", "--registry", url], monkeypatch, capsys)
    c_deploy, _, err_deploy = run_cli(
        ["deploy", "x", "--base", base, "--out", tmp_path / "deployed", "--registry", url], monkeypatch, capsys
    )
    c_gc, out_gc, err_gc = run_cli(["registry", "gc", "--registry", url], monkeypatch, capsys)
    FIGURES.append(
        {
            "step": step,
            "signal": sig.name,
            "gc": gc,
            "exit": code,
            "said": said,
            "listed": listed,
            "verify": c_verify,
            "deploy": c_deploy,
            "deploy_says": err_deploy.strip()[-160:],
            "gc_says": [line for line in out_gc.splitlines() if "withdrew" in line],
        }
    )
    print("\nFIGURE " + json.dumps(FIGURES[-1]))

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

    # and so is what the others say
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
    if sig == signal.SIGKILL and step in STEPS[1:4]:  # killed with its version pending: reported, not listed
        pending = "x@2 is not published: its push is over (process"
        assert pending in " ".join(out_verify.split()) and pending in " ".join(out_ls.split()), out_verify
        assert "withdrew x@2: its push is over" in " ".join(out_gc.split()), out_gc
    assert _ls_versions(url) == listed
    assert not list(Path(url, "patches", "x", "pending").glob("*")), "gc withdraws a push that is over"
    taken = {int(p.stem) for d in ("versions", "removed") for p in Path(url, "patches", "x", d).glob("*.json")}
    again = Registry.open(url).push("x", patch).manifest  # numbers never repeat; the push after it works
    assert again.version == max(taken) + 1 and Registry.open(url).verify().ok


# A `continual run` killed (SIGKILL) once task 1's version has its manifest, after a gc removed its blobs.
KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from splice.registry import store

    create = store.Registry._create_version

    def create_then_die(self, name, body, *rest):
        version = create(self, name, body, *rest)
        if version == 2:  # task 1's push: a gc removes its blobs, then the run is killed
            manifest = json.loads(Path(self.url, "patches", name, "versions", f"{version}.json").read_text())
            for entry in manifest["tensors"].values():
                digest = entry.get("blob") or entry["digest"]
                Path(self.url, "blobs", "sha256", digest[:2], digest).unlink(missing_ok=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return version

    store.Registry._create_version = create_then_die
    sys.argv = ["splice", *sys.argv[1:]]
    from splice.cli.app import main
    main()
""")


def test_continual_resume_reruns_a_task_whose_push_never_published(tmp_path):
    from test_continual import pipeline_file, tiny_vit

    from splice.workflows.continual.run import run_pipeline

    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    Registry.init(registry)
    path = pipeline_file(tmp_path, base, str(registry), epochs=1, rectify=False)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, "continual", "run", str(path), "-q"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = Registry.open(registry)
    assert [v.version for v in store.versions("cl")] == [1]  # task 1's version was never published
    resumed = run_pipeline(path, resume=True)  # before: version 2 was listed, and every resume failed on its blobs
    store = Registry.open(registry)
    assert resumed.resumed_tasks == 1 and len(resumed.accuracy) == 3
    assert [v.version for v in store.versions("cl")] == [1, 3, 4]  # task 1 ran again; 2 is never reused
    assert {a: r.version for a, r in store.aliases("cl").items()} == {"task-1": 1, "task-2": 3, "task-3": 4}
    assert store.verify().ok
    assert [line.split(":")[0] for line in store.gc().pending_withdrawn] == ["withdrew cl@2"]


def test_a_registry_written_before_pending_markers_reads_as_published(tmp_path, monkeypatch, capsys):
    """tests/data/registry_before_pending was written by the splice before this change (old@1 aliased prod,
    old@2, old@3 removed): it has no pending markers, and every version in it is published."""
    import shutil

    url = str(tmp_path / "registry")
    shutil.copytree(Path(__file__).parent / "data" / "registry_before_pending", url)
    store = Registry.open(url)
    assert [m.version for m in store.versions("old")] == [1, 2]
    assert store.resolve("old@prod").version == 1 and store.resolve("old").version == 2
    for version in (1, 2):
        patch = store.load(f"old@{version}")
        assert all(patch.tensors[name] is not None for name in patch.tensors)  # every tensor reads, hash-checked
    assert store.verify().ok and store.verify().pending == []
    report = store.gc(grace_seconds=0)  # frees old@3's blobs only
    assert report.pending_withdrawn == [] and report.blobs_kept_live == 2 and store.verify().ok
    assert [m.version for m in store.versions("old")] == [1, 2]
    code, out, _ = run_cli(["registry", "ls", "old", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "problem" not in out
    from test_registry import make_patch

    assert store.push("old", make_patch(53)).manifest.version == 4  # after the removed 3: numbers never repeat
    assert [m.version for m in Registry.open(url).versions("old")] == [1, 2, 4]


def test_continual_resume_reruns_a_task_whose_version_lost_its_blobs(tmp_path):
    """A version published with blobs that later went missing (as the push before this change could leave one):
    --resume does not build on it; that task runs again."""
    from test_continual import TASK_FILE, pipeline_file, tiny_vit

    from splice.workflows.continual.run import run_pipeline

    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    store = Registry.init(registry)
    tasks = [{"name": f"t{i}", "data": f"{TASK_FILE}:task_{i}"} for i in range(2)]
    path = pipeline_file(tmp_path, base, str(registry), epochs=1, rectify=False, tasks=tasks)
    run_pipeline(path)
    first, second = store.versions("cl")
    kept = {e.blob_digest for e in first.tensors.values()}
    for digest in {e.blob_digest for e in second.tensors.values()} - kept:  # task 1's own blobs
        Path(registry, "blobs", "sha256", digest[:2], digest).unlink()
    assert store.missing_blobs(second) and not store.missing_blobs(first)
    resumed = run_pipeline(path, resume=True)  # before: every resume failed reading cl@2's blobs
    assert resumed.resumed_tasks == 1 and len(resumed.accuracy) == 2
    assert Registry.open(registry).resolve("cl@task-2").version == 3  # task 2 (1-based aliases)


def test_resolving_a_version_asks_for_its_pending_marker_before_its_tombstone(tmp_path):
    """A store may answer one batch of requests in any order (S3's are sent at once). A gc withdraws a pending
    version by tombstone, manifest, then marker; a reader that saw no tombstone and then no marker took the
    withdrawn version for a published one."""
    from test_registry import make_patch

    from splice.registry import RegistryError, maintenance
    from splice.registry.layout import pending_rel

    registry = Registry.init(tmp_path / "registry")
    registry.push("x", make_patch(71))
    backend = registry._backend
    marker = {"host": "another-machine", "pid": 4242, "started": 1.0, "expires": 2.0}
    assert backend.create(pending_rel("x", 1), json.dumps(marker).encode())  # x@1 as a push that was killed
    real = backend.sizes

    def any_order(rels):  # the batch answered last request first, with a gc's withdrawal landing in between
        if len(rels) < 2:
            return real(rels)
        last = real(rels[-1:])
        maintenance.withdraw(backend, "x", 1, "")
        return real(rels[:-1]) + last

    backend.sizes = any_order
    with pytest.raises(RegistryError, match="not published|was removed"):
        registry.resolve("x@1")


def test_ls_name_reports_the_pending_version_of_a_name_with_nothing_published(tmp_path, monkeypatch, capsys):
    """A name's first push killed with its version pending: `registry ls` lists the name (0 versions); `ls NAME`
    said "no patch named x ... `splice registry ls` lists them" and hid the pending version it reports for
    every other name."""
    from test_registry import make_patch

    from splice.registry.layout import pending_rel

    url = str(tmp_path / "registry")
    registry = Registry.init(url)
    registry.push("x", make_patch(72))
    marker = {"host": "another-machine", "pid": 4242, "started": 1.0, "expires": 2.0}
    assert registry._backend.create(pending_rel("x", 1), json.dumps(marker).encode())  # as a killed push left it
    code, out, err = run_cli(["registry", "ls", "--registry", url], monkeypatch, capsys)
    assert code == 0 and "x" in out, err
    code, out, err = run_cli(["registry", "ls", "x", "--registry", url], monkeypatch, capsys)
    assert code == 0, err
    assert "x@1 is not published: its push is over" in " ".join((out + err).split()), out + err


def test_a_gc_that_takes_a_live_push_for_over_never_withdraws_what_the_push_reports_published(tmp_path):
    """A gc judged a live push over (a clock far ahead, or a pid namespace it cannot see into) and goes to withdraw
    its version, racing the push that is publishing it. Both sides settle the outcome by creating one decision
    file exclusively: whoever is second follows the first, so a version is never reported published and then
    withdrawn (before: push removed its marker and saw no tombstone, then the gc's tombstone removed it)."""
    from test_registry import make_patch

    from splice.registry import maintenance, store

    registry = Registry.init(tmp_path / "registry")
    backend = registry._backend
    real_delete = type(backend).delete
    gc_said, raced = [], []

    def marker_deleted_then_gc(self, rel):  # the push decided and removes its marker; the gc's withdrawal lands
        real_delete(self, rel)
        if "/pending/" in rel and not raced:
            raced.append(rel)
            gc_said.append(maintenance.withdraw_pending(backend, registry.url, "x", 1, ""))

    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(type(backend), "delete", marker_deleted_then_gc)
        pushed = registry.push("x", make_patch(81)).manifest
    assert pushed.version == 1 and gc_said == [False]  # the gc followed the push's decision
    store_now = Registry.open(tmp_path / "registry")
    assert [m.version for m in store_now.versions("x")] == [1] and store_now.verify().ok
    assert store_now.load("x@1").tensors  # every blob there

    real_decide = store.decide

    def gc_first(backend_, url, name, version, outcome):  # the gc decides first: the push must not publish
        maintenance.withdraw_pending(backend_, url, name, version, "")
        return real_decide(backend_, url, name, version, outcome)

    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(store, "decide", gc_first)
        with pytest.raises(splice.registry.RegistryError, match="withdrew it.*x@2 was withdrawn: push again"):
            registry.push("x", make_patch(82))
    store_now = Registry.open(tmp_path / "registry")
    assert [m.version for m in store_now.versions("x")] == [1] and store_now.verify().ok
    assert store_now.push("x", make_patch(83)).manifest.version == 3  # 2 is never handed out again


def test_a_push_stopped_after_it_decided_to_publish_is_published_and_says_so(tmp_path):
    """Ctrl-C between the decision to publish and the marker's removal: the version is complete, so it is
    published and the message says so; a SIGKILL there leaves the marker, and gc completes the publication."""
    from test_registry import make_patch

    from splice.errors import Interrupted
    from splice.registry import maintenance
    from splice.registry.layout import pending_rel
    from splice.registry.leases import PendingPush

    registry = Registry.init(tmp_path / "registry")
    backend = registry._backend
    real_delete = type(backend).delete

    interrupts = [KeyboardInterrupt]

    def interrupted_at_the_marker(self, rel):  # one Ctrl-C, as the push removes its marker
        if "/pending/" in rel and interrupts:
            raise interrupts.pop()
        real_delete(self, rel)

    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(type(backend), "delete", interrupted_at_the_marker)
        with pytest.raises(
            Interrupted,
            match=r"x@1 was published, but alias prod was not moved: "
            r"`splice registry tag x@1 prod` moves it",
        ):
            registry.push("x", make_patch(84), alias="prod")
    assert [m.version for m in Registry.open(tmp_path / "registry").versions("x")] == [1]

    # a push killed right after deciding: its marker names a process that is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = PendingPush(host=this_host(), pid=int(dead.stdout), started=time.time(), expires=time.time() + 60)
    kept = []
    with pytest.MonkeyPatch.context() as patcher:  # as if killed before the marker went: it stays
        patcher.setattr(
            type(backend),
            "delete",
            lambda self, rel: kept.append(rel) if "/pending/" in rel and not kept else real_delete(self, rel),
        )
        registry.push("x", make_patch(85))
    assert kept == [pending_rel("x", 2)]
    backend.remove_entry(pending_rel("x", 2))
    assert backend.create(pending_rel("x", 2), claim.model_dump_json().encode())
    assert [m.version for m in Registry.open(tmp_path / "registry").versions("x")] == [1]  # pending: not listed
    assert maintenance.decide(backend, registry.url, "x", 2, "withdrawn") == "published"  # decided before
    report = Registry.open(tmp_path / "registry").gc(grace_seconds=0)
    assert report.pending_withdrawn == [] and report.pending_completed[0].startswith("published x@2")
    store_now = Registry.open(tmp_path / "registry")
    assert [m.version for m in store_now.versions("x")] == [1, 2] and store_now.verify().ok
    assert store_now.load("x@2").tensors


def test_a_manifest_put_retried_after_it_was_applied_is_taken_for_this_pushs_own(tmp_path):
    """S3: a conditional put that timed out but was applied, retried, answers 412 to its own first write. The push
    must see its own manifest there, not an older splice's: before, it dropped its pending marker (publishing that
    version without the blob check) and pushed again as the next number."""
    from test_registry import make_patch

    registry = Registry.init(tmp_path / "registry")
    backend = registry._backend
    real_create = type(backend).create

    def applied_then_412(self, rel, data):
        created = real_create(self, rel, data)
        return created and "/versions/" not in rel  # the manifest is written, but the retry says it existed

    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(type(backend), "create", applied_then_412)
        pushed = registry.push("x", make_patch(86)).manifest
    store_now = Registry.open(tmp_path / "registry")
    assert pushed.version == 1 and [m.version for m in store_now.versions("x")] == [1]
    assert store_now.verify().ok and store_now.verify().pending == []
