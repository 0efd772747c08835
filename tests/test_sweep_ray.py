"""`splice sweep` on Ray (issue 18), against a real local cluster on 127.0.0.1 that this module starts once: the
same seeded sweep gives the same trials on Ray as on the local pool, a Ray worker killed mid-trial is retried and
its trial counted once, an address where nothing answers is one line within a bound, each task declares the
memory its merge needs (a candidate no node could hold is refused before any trial), and the CLI runs it all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file

import splice
from splice.errors import SpliceError
from splice.workflows.sweep import executors
from splice.workflows.sweep.candidate import Evaluator
from splice.workflows.sweep.executors import RayExecutor
from splice.workflows.sweep.file import load_sweep
from splice.workflows.sweep.run import WORKER_BASELINE_BYTES, _resources_for

from conftest import save, tiny_model
from helpers import load_dir

ROOT = str(Path(splice.__file__).parents[1])
ENV = {**os.environ, "PYTHONPATH": ROOT, "COLUMNS": "200"}
RAY = str(Path(sys.executable).with_name("ray"))  # the ray command of this interpreter's environment
CLUSTER_MEMORY = 4 << 30  # the `memory` resource the cluster offers: a candidate needing more is refused
START_SECONDS = 120

# The merge is linear between two models A and B: the merged state is B + lam * (A - B), lam = wA / (wA + wB).
# The hook recovers lam from the state and scores -(lam - 0.6)^2; it logs each call (its process, lam, and the
# resources Ray assigned it), and kills its own process the first time it meets `kill_at`.
HOOK = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from safetensors.torch import load_file

    ENDS = {}


    def lam_of(state, a, b):
        if not ENDS:
            ENDS["a"], ENDS["b"] = load_file(a), load_file(b)
        A, B = ENDS["a"], ENDS["b"]
        along = sum(float(((state[k].double() - B[k].double()) * (A[k].double() - B[k].double())).sum()) for k in A)
        return along / sum(float(((A[k].double() - B[k].double()) ** 2).sum()) for k in A)


    def score(state, *, a, b, log, kill_at=None, marker=None):
        lam = lam_of(state, a, b)
        resources = gcs = None
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            context = sys.modules["ray"].get_runtime_context()
            resources, gcs = context.get_assigned_resources(), context.gcs_address
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "lam": lam, "resources": resources, "gcs": gcs}) + "\\n")
        if kill_at is not None and abs(lam - kill_at) < 1e-5 and not Path(marker).exists():
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return -((lam - 0.6) ** 2)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> str:
    """A Ray head on 127.0.0.1 (2 CPUs, no GPU, CLUSTER_MEMORY) whose workers import this checkout; its address.
    `ray start --block` keeps the cluster's processes in one process group of ours, stopped through it at the
    end (`ray stop` would stop every Ray cluster on the machine)."""
    port, client_port = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    log = Path(temp_dir) / "ray-start.log"
    with log.open("w") as output:
        head = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                f"--ray-client-server-port={client_port}",  # ray://127.0.0.1:PORT (the `ray` extra is ray[client])
                "--num-cpus=2",
                "--num-gpus=0",
                f"--memory={CLUSTER_MEMORY}",
                "--object-store-memory=100000000",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # token authentication depends on the machine's ~/.ray (a token there turns it on): off, as drivers expect
            env={**ENV, "RAY_AUTH_MODE": "disabled"},
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"ray start exited {head.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"ray start did not finish in {START_SECONDS} s"
            time.sleep(0.2)
        CLIENT["address"] = f"ray://127.0.0.1:{client_port}"
        CLIENT["logs"] = f"{temp_dir}/session_latest/logs"
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.send_signal(signal.SIGTERM)  # ray start stops what it started, then exits
        try:
            head.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


CLIENT: dict[str, str] = {}  # the cluster's Ray client address and its logs' folder, once `cluster` has started it


def client_server_logs() -> str:
    """The tail of each Ray client server's error log: why the head could not serve a client, when it could not."""
    logs = sorted(Path(CLIENT["logs"]).glob("ray_client_server*.err"))
    return "".join(f"\n--- {log.name}:\n{log.read_text()[-1500:]}" for log in logs)


@pytest.fixture(scope="module")
def client_address(cluster: str) -> str:
    return CLIENT["address"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("ray-models")
    return {name: save(tiny_model("llama", seed), where / name, sharded=False) for name, seed in (("a", 0), ("b", 1))}


def sweep_file(directory: Path, models: dict[str, Path], search: dict, parameters: dict, **hook_args) -> Path:
    """A linear merge of A and B with A's and B's weights searched as `parameters` gives them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hook.py").write_text(HOOK)
    args = {
        "a": str(models["a"] / "model.safetensors"),
        "b": str(models["b"] / "model.safetensors"),
        "log": str(directory / "calls.jsonl"),
        **hook_args,
    }
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["a"]), "parameters": {"weight": parameters["a"]}},
            {"model": str(models["b"]), "parameters": {"weight": parameters["b"]}},
        ],
    }
    path = directory / "sweep.yaml"
    sweep = {"recipe": recipe, "search": search, "evaluate": {"hook": "hook.py:score", "args": args}}
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def expected_score(values: dict) -> float:
    wa, wb = values["models[0].parameters.weight"], values["models[1].parameters.weight"]
    return -((wa / (wa + wb) - 0.6) ** 2)


def calls(directory: Path) -> list[dict]:
    log = directory / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def trials(out: Path) -> list[tuple]:
    results = json.loads((out / "sweep_results.json").read_text())
    return [(t["number"], t["values"], t["score"], t["error"]) for t in results["trials"]]


def largest_model_bytes(models: dict[str, Path]) -> int:
    return max(
        sum(t.numel() * t.element_size() for t in load_file(models[m] / "model.safetensors").values())
        for m in ("a", "b")
    )


def declared_memory(models: dict[str, Path]) -> int:
    """What a candidate's task declares: the merged model held twice over (the merge's result and what the hook
    makes of it), each counted at twice the largest input's stored bytes (float32 working copies of half-precision
    inputs), and a worker's own."""
    return 2 * (2 * largest_model_bytes(models)) + WORKER_BASELINE_BYTES


GRID = {"a": {"search": "choice", "values": [0.5, 1.0, 2.0]}, "b": {"search": "choice", "values": [1.0, 3.0]}}
CONTINUOUS = {"a": {"search": "uniform", "low": 0.1, "high": 3.0}, "b": {"search": "uniform", "low": 0.5, "high": 2.0}}


@pytest.mark.parametrize(
    ("search", "parameters"),
    [({"method": "tpe", "seed": 3, "trials": 12}, CONTINUOUS), ({"method": "grid"}, GRID)],
    ids=["tpe", "grid"],
)
def test_a_seeded_sweep_on_ray_is_the_sweep_on_the_local_pool(cluster, models, tmp_path, search, parameters):
    path = sweep_file(tmp_path / "sweep", models, search, parameters)
    local = splice.sweep(path, out=tmp_path / "local", workers=2)
    assert len(calls(tmp_path / "sweep")) == local.budget
    (tmp_path / "sweep" / "calls.jsonl").unlink()
    on_ray = splice.sweep(path, out=tmp_path / "ray", executor="ray", address=cluster, workers=2)

    assert (on_ray.executor, on_ray.workers, local.workers) == ("ray", 2, 2)
    assert trials(tmp_path / "ray") == trials(tmp_path / "local")
    assert len(trials(tmp_path / "ray")) == (12 if search["method"] == "tpe" else 6)
    for _number, values, score, error in trials(tmp_path / "ray"):
        assert error is None and score == pytest.approx(expected_score(values), rel=1e-5, abs=1e-9)
    assert on_ray.best.number == local.best.number and on_ray.best.values == local.best.values
    assert (tmp_path / "ray" / "best_recipe.yaml").read_bytes() == (
        tmp_path / "local" / "best_recipe.yaml"
    ).read_bytes()
    ray_best, local_best = load_dir(tmp_path / "ray" / "best"), load_dir(tmp_path / "local" / "best")
    assert ray_best.keys() == local_best.keys()
    assert all(torch.equal(ray_best[name], local_best[name]) for name in local_best)
    if search["method"] == "grid":  # the best of the grid: lam = 2 / (2 + 1), the closest to 0.6
        assert on_ray.best.values == {"models[0].parameters.weight": 2.0, "models[1].parameters.weight": 1.0}

    # every candidate ran in a Ray worker (not here), holding the resources its task declared
    heard = calls(tmp_path / "sweep")
    assert len(heard) == on_ray.budget
    assert os.getpid() not in {call["pid"] for call in heard}
    assert {record.worker.split(":")[1] for record in on_ray.trials} <= {str(call["pid"]) for call in heard}
    memory = declared_memory(models)
    for call in heard:
        assert call["resources"] == {"CPU": 1.0, "memory": float(memory)}
        assert call["gcs"].endswith(f":{cluster.split(':')[1]}")


def test_a_worker_killed_mid_trial_is_retried_and_its_trial_counted_once(cluster, models, tmp_path):
    directory = tmp_path / "sweep"
    marker = tmp_path / "killed.marker"
    path = sweep_file(directory, models, {"method": "grid"}, GRID, kill_at=0.5, marker=str(marker))  # wA = wB = 1
    report = splice.sweep(path, out=tmp_path / "out", executor="ray", address=cluster, workers=2)

    assert marker.exists()
    attempts = [call for call in calls(directory) if abs(call["lam"] - 0.5) < 1e-5]
    assert len(attempts) == 2 and attempts[0]["pid"] != attempts[1]["pid"]  # killed, then run again elsewhere
    recorded = trials(tmp_path / "out")
    assert [number for number, *_ in recorded] == list(range(6)) and report.budget == 6
    killed = [t for t in recorded if t[1] == {"models[0].parameters.weight": 1.0, "models[1].parameters.weight": 1.0}]
    assert len(killed) == 1
    _number, values, score, error = killed[0]
    assert error is None and score == pytest.approx(-((0.5 - 0.6) ** 2), rel=1e-5)
    assert all(error is None for *_, error in recorded)
    assert len(calls(directory)) == 6 + 1  # every trial once, and the killed attempt


def test_an_address_where_nothing_answers_is_one_line_exit_2_before_any_trial(models, tmp_path):
    path = sweep_file(tmp_path / "sweep", models, {"method": "grid"}, GRID)
    port = _free_port()  # bound, then closed: nothing listens there
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "splice", "sweep", path, "--executor", "ray", "--address", f"127.0.0.1:{port}"]
        + ["--out", tmp_path / "out", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: --address 127.0.0.1:{port}: cannot reach a Ray cluster there (Connection refused)"
    ]
    assert seconds < 60  # ray.init alone retries such an address for many minutes
    assert calls(tmp_path / "sweep") == []
    assert not (tmp_path / "out" / "sweep.journal").exists() and not (tmp_path / "out" / "sweep_results.json").exists()


class ClientServerThatFails:
    """Stands in for `ray` where a Ray client server could not start the session's server process `failures` times:
    ray.init raises what Ray's client raises then (the server's traceback under a first line that says nothing)."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def init(self, **kwargs) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionAbortedError(
                'Initialization failure from server:\nTraceback (most recent call last):\n  File "proxier.py"\n'
                "RuntimeError: Proxy failed to Connect to backend! Check `ray_client_server.err`\n"
            )


def test_a_client_server_that_fails_to_start_the_session_once_is_asked_again(monkeypatch):
    monkeypatch.setattr(executors, "RAY_INIT_RETRY_SECONDS", 0.0)
    ray_stand_in = ClientServerThatFails(failures=1)
    executors._connect(ray_stand_in, None)
    assert ray_stand_in.calls == 2


def test_a_client_server_that_keeps_failing_is_one_line_with_its_reason(monkeypatch):
    monkeypatch.setattr(executors, "RAY_INIT_RETRY_SECONDS", 0.0)
    ray_stand_in = ClientServerThatFails(failures=executors.RAY_INIT_ATTEMPTS)
    with socket.socket() as listening, pytest.raises(SpliceError) as raised:  # something answers at the address
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"ray://127.0.0.1:{listening.getsockname()[1]}"
        executors._connect(ray_stand_in, address)
    assert ray_stand_in.calls == executors.RAY_INIT_ATTEMPTS
    assert str(raised.value).splitlines() == [
        f"`address` {address}: cannot reach a Ray cluster there "
        "(RuntimeError: Proxy failed to Connect to backend! Check `ray_client_server.err`)"
    ]


def test_a_task_declares_its_merges_memory_and_a_candidate_no_node_holds_is_refused(cluster, models, tmp_path):
    path = sweep_file(tmp_path / "sweep", models, {"method": "grid"}, GRID)
    loaded = load_sweep(path)
    evaluator = Evaluator(loaded.hook, dict(loaded.file.evaluate.args))
    executor = RayExecutor(evaluator, cluster, None, _resources_for(loaded, evaluator), 60.0)
    try:
        declared = executor.resources
        assert (declared.num_cpus, declared.num_gpus) == (1.0, 0.0)
        assert declared.memory == declared_memory(models)
        assert declared.memory >= 2 * largest_model_bytes(models) + WORKER_BASELINE_BYTES
        assert executor.slots == 2  # what the cluster's 2 CPUs fit
    finally:
        executor.close()
    assert not ray.is_initialized()

    # a model of 1 GiB (a sparse file: its header says so, its disk holds nothing): 4 GiB for the candidate and
    # 1 GiB for a worker is more than the cluster's 4 GiB
    big = tmp_path / "big"
    big.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}}).encode()
    with (big / "model.safetensors").open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (1 << 30))
    recipe = yaml.safe_load(path.read_text())
    recipe["recipe"]["models"][0]["model"] = str(big)
    recipe["recipe"]["models"][1]["model"] = str(big)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(SpliceError) as refused:
        splice.sweep(path, out=tmp_path / "out", executor="ray", address=cluster)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        "a candidate needs about 5.0 GiB (the merged model held twice and a worker), more than the Ray cluster's "
        "4.0 GiB"
    )
    assert not ray.is_initialized()  # the connection made for the refused sweep was closed
    assert calls(tmp_path / "sweep") == []
    assert not (tmp_path / "out" / "sweep.journal").exists()


def test_the_cli_runs_a_sweep_on_the_cluster_through_its_client_address(client_address, models, tmp_path):
    path = sweep_file(tmp_path / "sweep", models, {"method": "random", "seed": 5, "trials": 4}, CONTINUOUS)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "splice", "sweep", path, "--executor", "ray", "--address", client_address]
        + ["--workers", "2"]
        + ["--out", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr + client_server_logs()
    results = json.loads((out / "sweep_results.json").read_text())
    assert (results["executor"], results["workers"], results["budget"]) == ("ray", 2, 4)
    assert [t["number"] for t in results["trials"]] == [0, 1, 2, 3]
    for trial in results["trials"]:
        assert trial["score"] == pytest.approx(expected_score(trial["values"]), rel=1e-5, abs=1e-9)
        assert trial["worker"].split(":")[1] != str(process.pid)
    best = max(results["trials"], key=lambda t: t["score"])
    assert results["best"]["number"] == best["number"]
    assert f"best: trial {best['number']}" in stdout
    assert (out / "best_recipe.yaml").is_file() and (out / "sweep_results.csv").is_file()
    wa, wb = best["values"]["models[0].parameters.weight"], best["values"]["models[1].parameters.weight"]
    a, b = load_file(models["a"] / "model.safetensors"), load_file(models["b"] / "model.safetensors")
    merged = load_dir(out / "best")
    assert merged.keys() == a.keys()
    for name, tensor in merged.items():
        assert torch.allclose(tensor, (wa * a[name] + wb * b[name]) / (wa + wb), rtol=1e-5, atol=1e-6), name
    heard = calls(tmp_path / "sweep")
    assert len(heard) == 4 and process.pid not in {call["pid"] for call in heard}


def test_without_an_address_the_sweep_starts_a_cluster_of_its_own(cluster, models, tmp_path, monkeypatch):
    """No `address`: a cluster started in this process and gone with the sweep, not one that RAY_ADDRESS (or the
    last `ray start` on the machine, which may have stopped since) names."""
    monkeypatch.setenv("RAY_ADDRESS", cluster)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # the new cluster's files: here, not in /tmp/ray
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # else ray.init sets it to token in os.environ, for good
    path = sweep_file(tmp_path / "sweep", models, {"method": "grid", "trials": 2}, GRID)
    try:
        report = splice.sweep(path, out=tmp_path / "out", executor="ray", workers=1)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not ray.is_initialized()
    assert [t.error for t in report.trials] == [None, None] and report.workers == 1
    heard = calls(tmp_path / "sweep")
    assert len(heard) == 2
    assert all(call["gcs"] and not call["gcs"].endswith(f":{cluster.split(':')[1]}") for call in heard)
