"""What splice writes never destroys what it reads, leaves no orphaned partial output, leaks no file through a
link, and trusts no ambiguous safetensors header (issue 10: items 4, 9, 10 and 11)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from test_bad_inputs import KILLED_SCRIPT

import splice
from splice.adapters.extract import extract_patch
from splice.errors import CheckpointError
from splice.registry.store import Registry
from splice.tensors.checkpoint import MAX_FILE_BYTES, Checkpoint
from splice.tensors.partials import OWNER, PARTIAL

from helpers import load_dir, run_cli, wait_for_marker

# -- item 4: an --out that is, contains or sits inside an input or the registry ----------------------------


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under `roots`, byte for byte (links as their targets' names)."""
    found = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_symlink():
                found[str(path)] = os.readlink(path).encode()
            elif path.is_file():
                found[str(path)] = path.read_bytes()
    return found


@pytest.fixture
def place(make_models, tmp_path):
    """Two models under p/ (a base and its fine-tune), a patch of each kind used under q/, a registry under r/."""
    base, tuned = make_models("bert", 2)
    p = tmp_path / "p"
    p.mkdir()
    os.rename(base, p / "a")
    os.rename(tuned, p / "b")
    q = tmp_path / "q"
    extract_patch(p / "a", p / "b", "delta", device="cpu").save(q / "delta")
    extract_patch(p / "a", p / "b", "lora", rank=2, device="cpu").save(q / "lora")
    registry = Registry.init(str(tmp_path / "r" / "registry"))
    registry.push("task", q / "delta")
    scorer = tmp_path / "score.py"
    scorer.write_text("def score(state):\n    return 0.0\n")
    recipe = p / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(p / "a"),
                "models": [{"model": str(p / "b"), "parameters": {"weight": 1.0}}],
            }
        )
    )
    return tmp_path


def refusals(root: Path) -> list[list]:
    """A command line for every command that writes an --out, each --out one that is, contains or sits
    inside one of its inputs (the models, the recipe, the patch, the base, the registry)."""
    p, q, r = root / "p", root / "q", root / "r"
    models = [str(p / "a"), str(p / "b")]
    return [
        ["soup", *models, "--out", p],
        ["soup", *models, "--out", p / "a"],
        ["soup", *models, "--out", p / "b" / "inner"],
        ["soup", *models, "--out", p, "--greedy", "--eval", f"{root / 'score.py'}:score"],
        ["merge", p / "recipe.yaml", "--out", p],
        ["merge", root / "p" / "recipe.yaml", "--out", p / "a"],
        ["fuse", *models, "--out", p, "--align", "weights"],
        ["patch", "extract", "--base", p / "a", "--tuned", p / "b", "--kind", "delta", "--out", p],
        ["patch", "extract", "--base", p / "a", "--tuned", p / "b", "--kind", "delta", "--out", p / "b"],
        ["patch", "apply", q / "delta", "--base", p / "a", "--out", q],
        ["patch", "apply", q / "delta", "--base", p / "a", "--out", p],
        ["patch", "merge", q / "delta", q / "delta", "--method", "linear", "--out", q],
        ["patch", "merge", q / "lora", q / "lora", "--method", "linear", "--base", p / "a", "--out", p / "a"],
        ["patch", "merge", "task@1", q / "delta", "--method", "linear", "--registry", r / "registry", "--out", r],
        ["patch", "export", q / "lora", "--peft", "--out", q],
        ["patch", "export", q / "lora", "--peft", "--out", p / "a"],
        ["deploy", "task@1", "--base", p / "a", "--out", r, "--registry", r / "registry"],
        [
            "deploy",
            "task@1",
            "--base",
            p / "a",
            "--out",
            r / "registry" / "x",
            "--registry",
            f"file://{r / 'registry'}",
        ],
        ["deploy", "task@1", "--base", p / "a", "--out", p, "--registry", r / "registry"],
    ]


@pytest.mark.parametrize("force", [True, False])
def test_no_command_writes_over_its_inputs_or_the_registry(place, force, monkeypatch, capsys):
    before = snapshot(place)
    for args in refusals(place):
        code, out, err = run_cli([*args, *(["--force"] if force else [])], monkeypatch, capsys)
        said = " ".join((out + err).split())
        assert code != 0, args
        assert "writing there would destroy it" in said and "choose an --out outside it" in said, (args, said)
        assert "Traceback" not in out + err
        assert snapshot(place) == before, f"{args} changed its inputs"
        assert not [path for path in place.rglob(f"*{PARTIAL}*")], args
    # the same commands into a fresh --out still work
    code, out, err = run_cli(
        ["soup", str(place / "p" / "a"), str(place / "p" / "b"), "--out", place / "soup", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert code == 0, out + err


def test_a_loaded_patch_is_not_written_over_its_own_source(place):
    patch = splice.Patch.load(place / "q" / "delta")  # its tensors are read from q/delta when used
    before = snapshot(place)
    with pytest.raises(splice.SpliceError, match="the patch's source"):
        patch.save(place / "q", force=True)
    with pytest.raises(splice.SpliceError, match="contains an input"):
        splice.apply_patches([patch], place / "p" / "a", place / "q", force=True, device="cpu")
    assert snapshot(place) == before


# -- item 9: partial outputs of killed runs are removed by the next run; a live run's are not --------------

# the killed merge of test_bad_inputs, slower: the live run must outlast this test's own runs
SLOW_SOUP = KILLED_SCRIPT.replace("time.sleep(0.3)", "time.sleep(1.0)")
assert SLOW_SOUP != KILLED_SCRIPT


def start_slow_soup(models: list[str], out: Path, tmp_path: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    script, marker = tmp_path / "slow_soup.py", tmp_path / f"started-{tag}"
    script.write_text(SLOW_SOUP)
    process = subprocess.Popen(
        [sys.executable, str(script), *models, str(out), str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1])},
    )
    return process, marker


def partials(out: Path) -> dict[int, Path]:
    """The partial directories of `out` this splice names (pid-hex), by the pid in their names."""
    prefix = f".{out.name}{PARTIAL}"
    found = [
        re.fullmatch(r"(\d+)-[0-9a-f]{8}", p.name[len(prefix) :])
        for p in out.parent.iterdir()
        if p.name.startswith(prefix)
    ]
    return {int(m.group(1)): out.parent / f"{prefix}{m.group(0)}" for m in found if m}


def test_next_run_removes_partials_of_killed_runs_and_keeps_a_live_ones(make_models, tmp_path, caplog):
    models = make_models("bert", 2)
    out = tmp_path / "outputs" / "merged"
    killed, killed_marker = start_slow_soup(models, out, tmp_path, "killed")
    live = None
    try:
        wait_for_marker(killed, killed_marker)
        (killed_partial,) = out.parent.glob(f".{out.name}{PARTIAL}*")
        live, live_marker = start_slow_soup(models, out, tmp_path, "live")
        wait_for_marker(live, live_marker)
        (live_partial,) = set(out.parent.glob(f".{out.name}{PARTIAL}*")) - {killed_partial}
        killed.send_signal(signal.SIGKILL)  # after the live run started: it is the next run that must clean
        assert killed.wait(timeout=30) == -signal.SIGKILL

        with caplog.at_level(logging.INFO, logger="splice.tensors.partials"):
            splice.soup(models, out, device="cpu")
        assert not killed_partial.exists(), "the killed run's partial output is still there"
        assert live_partial.is_dir() and live.poll() is None, "a live run's partial was removed"
        assert (live_partial / OWNER).is_file() and partials(out) == {live.pid: live_partial}
        assert sum("no longer runs" in r.getMessage() for r in caplog.records) == 1
        assert not (out / OWNER).exists() and set(load_dir(out))

        # what a killed run leaves when its pid has been reused since (here by this test): its lock, not its
        # pid, says it is dead; one killed before its lock file existed; one named by an older splice
        reused = out.parent / f".{out.name}{PARTIAL}{os.getpid()}-0123abcd"
        reused.mkdir()
        (reused / OWNER).write_text(f"{os.getpid()}\n")
        unlocked = out.parent / f".{out.name}{PARTIAL}{killed.pid}-4567cdef"
        unlocked.mkdir()
        (unlocked / "model.safetensors").write_bytes(b"\0" * 1000)
        legacy = out.parent / f".{out.name}{PARTIAL}89abcdef"
        legacy.mkdir()
        splice.soup(models, out, device="cpu", force=True)
        assert not reused.exists() and not unlocked.exists()
        assert live_partial.is_dir() and legacy.is_dir()
    finally:
        for process in (killed, live):
            if process is not None:
                if process.poll() is None:
                    process.kill()
                process.wait()
                process.stderr.close()
    # once the live run is dead too, the next run clears its partial as well
    splice.soup(models, out, device="cpu", force=True)
    assert partials(out) == {} and legacy.is_dir()


def dead_runs_partial(out: Path) -> Path:
    """What a SIGKILLed run leaves (a partial with some bytes and an owner file nobody holds locked), named
    with a pid that is alive now (this test's): only the lock can tell it is dead."""
    partial = out.parent / f".{out.name}{PARTIAL}{os.getpid()}-feedbeef"
    partial.mkdir(parents=True)
    (partial / OWNER).write_text("1\n")
    (partial / "model.safetensors").write_bytes(b"\0" * 4096)
    return partial


@pytest.mark.parametrize("command", ["deploy", "registry pull", "patch extract", "greedy soup"])
def test_every_writer_clears_the_partials_of_dead_runs(place, command, monkeypatch, capsys):
    p, r, out = place / "p", place / "r" / "registry", place / "outputs" / "x"
    stale = dead_runs_partial(out)
    args = {
        "deploy": ["deploy", "task@1", "--base", p / "a", "--registry", r, "--device", "cpu"],
        "registry pull": ["registry", "pull", "task@1", "--registry", r],
        "patch extract": [
            "patch",
            "extract",
            "--base",
            p / "a",
            "--tuned",
            p / "b",
            "--kind",
            "layernorm",
            "--device",
            "cpu",
        ],
        "greedy soup": [
            "soup",
            p / "a",
            p / "b",
            "--greedy",
            "--eval",
            f"{place / 'score.py'}:score",
            "--device",
            "cpu",
        ],
    }[command]
    code, said, err = run_cli([*args, "--out", out], monkeypatch, capsys)
    assert code == 0, said + err
    assert not stale.exists() and out.is_dir() and not (out / OWNER).exists()
    assert [path.name for path in out.parent.iterdir()] == ["x"]


KILL_ROUNDS, RUNS_PER_ROUND = 2, 3
FAST_SOUP = KILLED_SCRIPT.replace("time.sleep(0.3)", "time.sleep(0.04)")


def test_random_kills_into_one_output_publish_nothing_broken_and_leave_nothing(make_models, tmp_path):
    """Rounds of soups racing into one --out, each SIGKILLed at a random point (before, while or after it
    streams and publishes): the output is always absent or a whole model, and the next run leaves no partial."""
    models = make_models("bert", 2)
    out = tmp_path / "outputs" / "merged"
    script = tmp_path / "fast_soup.py"
    script.write_text(FAST_SOUP)
    chance = random.Random(10)
    kills = published = orphans = 0
    for round_index in range(KILL_ROUNDS):
        runs = [
            subprocess.Popen(
                [sys.executable, str(script), *models, str(out), str(tmp_path / f"m{round_index}")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1])},
            )
            for _ in range(RUNS_PER_ROUND)
        ]
        try:
            wait_for_marker(runs[0], tmp_path / f"m{round_index}")
            for run in runs:
                time.sleep(chance.uniform(0, 0.8))
                run.send_signal(signal.SIGKILL)
                kills += run.wait(timeout=30) == -signal.SIGKILL
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
                run.wait()
                run.stderr.close()
        if out.exists():  # a run that finished before its kill published a whole model, nothing less
            published += 1
            assert Checkpoint.open(out).tensors.keys() == Checkpoint.open(models[0]).tensors.keys()
            assert set(load_dir(out)) and not (out / OWNER).exists()
        orphans += len(list(out.parent.glob(f".{out.name}{PARTIAL}*")))
        splice.soup(models, out, device="cpu", force=True)
        assert partials(out) == {}, f"round {round_index}: partials of killed runs are left"
        assert [p.name for p in out.parent.iterdir()] == [out.name]
        shutil.rmtree(out)  # the next round races into a fresh --out
    assert kills >= 1 and orphans >= 1  # killed runs did leave partials, and the next runs removed them all
    print(
        f"kill rounds {KILL_ROUNDS}, runs {KILL_ROUNDS * RUNS_PER_ROUND}, SIGKILLs {kills}, partials of killed "
        f"runs removed {orphans}, outputs published before a kill {published}, broken outputs 0, partials left 0"
    )


def test_a_failed_run_leaves_no_partial_and_no_lock_file(make_models, tmp_path):
    models = make_models("bert", 2)
    out = tmp_path / "merged"

    class Failing:
        def start(self, *args, **kwargs):
            pass

        def advance(self, items, nbytes):
            assert [p for p in tmp_path.iterdir() if p.name.startswith(f".merged{PARTIAL}")]
            raise KeyboardInterrupt

        def finish(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        splice.soup(models, out, device="cpu", progress=Failing())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    splice.soup(models, out, device="cpu")
    assert not any(p.name.startswith(".splice") for p in out.iterdir())
    # replacing an output: the old one becomes a partial of this run (a kill while deleting it leaves it to
    # the next run's cleaning), then goes
    (out / "old-only.txt").write_text("from the replaced output\n")
    splice.soup(models, out, device="cpu", force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged") or p.name.startswith(".")) == [
        "merged"
    ]
    assert not (out / "old-only.txt").exists() and not (out / OWNER).exists()


# -- item 10: side files are bounded regular files of the model directory ---------------------------------


SOUP_LOGGED = textwrap.dedent("""
    import logging, resource, sys
    import splice

    resource.setrlimit(resource.RLIMIT_AS, (8 * 1024**3, 8 * 1024**3))  # an unbounded read fails, not the host
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    report = splice.soup(sys.argv[1:3], sys.argv[3], device="cpu")
    print("side files:", ",".join(sorted(report.side_files)))
""")


def run_bounded(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1])},
    )


def test_linked_and_special_side_files_are_not_copied(make_models, tmp_path):
    base, tuned = make_models("bert", 2)
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    (Path(base) / "tokenizer_config.json").symlink_to(secret)
    (Path(base) / "vocab.txt").symlink_to("/dev/zero")
    os.mkfifo(Path(base) / "merges.txt")  # a reader that blocks for ever on open()
    with open(Path(base) / "tokenizer.json", "wb") as handle:  # sparse: larger than the bound, nothing on disk
        handle.truncate(MAX_FILE_BYTES + 1)
    (Path(base) / "special_tokens_map.json").write_text("{}\n")

    result = run_bounded(SOUP_LOGGED, base, tuned, str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "config.json" in written and "special_tokens_map.json" in written
    assert not {"tokenizer_config.json", "vocab.txt", "merges.txt", "tokenizer.json"} & set(written)
    assert "hunter2" not in "".join(p.read_text(errors="replace") for p in (tmp_path / "out").glob("*.json"))
    assert "side files: config.json,special_tokens_map.json" in result.stdout
    for name, why in [
        ("tokenizer_config.json", "symbolic link"),
        ("vocab.txt", "symbolic link"),
        ("merges.txt", "not a regular file"),
        ("tokenizer.json", f"over {MAX_FILE_BYTES} bytes"),
    ]:
        line = next((line for line in result.stderr.splitlines() if f"not copying {name} " in line), "")
        assert line.startswith("splice.tensors.writer: ") and why in line, (name, result.stderr[-2000:])


def test_a_config_linked_to_a_device_is_refused_not_read_for_ever(make_models, tmp_path):
    (base,) = make_models("bert", 1)
    (Path(base) / "config.json").unlink()
    (Path(base) / "config.json").symlink_to("/dev/zero")
    code = textwrap.dedent("""
        import resource, sys
        from splice.errors import CheckpointError
        from splice.tensors.checkpoint import Checkpoint
        resource.setrlimit(resource.RLIMIT_AS, (8 * 1024**3, 8 * 1024**3))
        try:
            Checkpoint.open(sys.argv[1]).config()
        except CheckpointError as exc:
            print("refused:", exc)
    """)
    result = run_bounded(code, base)
    assert result.returncode == 0 and "refused:" in result.stdout, result.stderr[-2000:]
    assert "config.json is not a regular file" in result.stdout


# -- item 11: a safetensors header that names a key twice -------------------------------------------------


def write_raw_safetensors(path: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header",
    [
        '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"dtype":"I32"}}',
        '{"__metadata__":{"format":"pt","format":"np"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    ],
)
def test_duplicate_keys_in_a_safetensors_header_are_refused(tmp_path, header, monkeypatch, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    write_raw_safetensors(model / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match="twice"):
        Checkpoint.open(model)
    code, out, err = run_cli(["inspect", model], monkeypatch, capsys)
    said = " ".join((out + err).split())
    assert code != 0 and "twice" in said and "Traceback" not in out + err
    # the same header without the repeat is read
    write_raw_safetensors(
        model / "model.safetensors", '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4
    )
    assert list(Checkpoint.open(model).tensors) == ["w"]
