"""Several work units computed at once (RunOptions.compute_threads) for kernels the CPU computes in slices: the same
output bit for bit as one thread, results handed to the writer in the plan's order, a failure in a compute thread
raised once with nothing published, kernels that must run one at a time (mergekit's) left on one thread, and kernels
that draw from torch's one generator (DARE, DELLA) drawing in the plan's order, each merged beside the next one's
draws (tensors/turns.py)."""

from __future__ import annotations

import threading

import pytest
import torch
import yaml
from test_ties_slices import ties_recipe

import splice
import splice.tensors.stream as stream
from splice.errors import NonFiniteOutputError
from splice.merge.kernels import method_kernel, weighted_average
from splice.options import RunOptions
from splice.tensors.stream import Kernel, compute_workers

from helpers import load_dir


def test_a_soup_on_three_compute_threads_equals_the_soup_on_one(make_models, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 64)  # the matrices computed in slices, so several threads work
    dirs = make_models("llama", 3)
    names = []
    original = stream._compute_unit

    def spy(unit, tensors, kernel, device, turn=None):
        names.append((unit.item.output.name, threading.current_thread().name))
        return original(unit, tensors, kernel, device, turn)

    monkeypatch.setattr(stream, "_compute_unit", spy)
    splice.soup(dirs, tmp_path / "one", weights=[0.5, 0.3, 0.2], device="cpu", compute_threads=1)
    on_one = set(names)
    names.clear()
    written = []
    original_write = stream.ShardedWriter.write

    def record(self, name, tensor, rows=None):
        written.append(name)
        return original_write(self, name, tensor, rows)

    monkeypatch.setattr(stream.ShardedWriter, "write", record)
    splice.soup(dirs, tmp_path / "three", weights=[0.5, 0.3, 0.2], device="cpu", compute_threads=3)
    one, three = load_dir(tmp_path / "one"), load_dir(tmp_path / "three")
    assert one.keys() == three.keys() and all(torch.equal(one[n], three[n]) for n in one)
    assert {thread for _, thread in on_one} == {threading.current_thread().name}
    assert len({thread for _, thread in names}) > 1 and all(t.startswith("splice-compute") for _, t in names)
    assert written == [name for name in one if name in dict(names)]  # the plan's order, whatever finished first


def test_ties_on_two_compute_threads_equals_ties_on_one(make_models, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 64)
    dirs = make_models("llama", 3)
    recipe = ties_recipe(tmp_path, dirs, "float32")
    splice.merge(recipe, tmp_path / "one", device="cpu", compute_threads=1)
    splice.merge(recipe, tmp_path / "two", device="cpu", compute_threads=2)
    one, two = load_dir(tmp_path / "one"), load_dir(tmp_path / "two")
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_a_failure_in_a_compute_thread_is_raised_once_and_nothing_is_published(make_models, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 64)
    dirs = make_models("llama", 2)
    recipe = tmp_path / "overflow.yml"  # norm weights of 1.0 times 1e5 twice: past float16's 65504
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": str(d), "parameters": {"weight": 1e5}} for d in dirs],
                "parameters": {"normalize": False},
                "dtype": "float16",
            }
        )
    )
    with pytest.raises(NonFiniteOutputError, match="NaN/Inf") as raised:
        splice.merge(recipe, tmp_path / "out", device="cpu", compute_threads=2)
    assert len(str(raised.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_only_kernels_computed_in_slices_on_the_cpu_get_several_threads():
    run = RunOptions(compute_threads=3)
    cpu = torch.device("cpu")
    assert compute_workers(weighted_average([1, 1]), cpu, run) == 3
    assert compute_workers(method_kernel("ties", lambda name: {}, 0), cpu, run) == 3
    assert compute_workers(method_kernel("dare_ties", lambda name: {}, 0), cpu, run) == 3  # drawing in turns
    through_mergekit = method_kernel("dare_ties", lambda name: {}, 0, prefer_own=False)
    assert compute_workers(through_mergekit, cpu, run) == 1  # draws as it computes: one at a time, in order
    assert compute_workers(Kernel(lambda name, tensors: tensors[0]), cpu, run) == 1
    assert compute_workers(weighted_average([1, 1]), torch.device("meta"), run) == 1
    auto = compute_workers(weighted_average([1, 1]), cpu, RunOptions())
    assert 1 <= auto <= stream.AUTO_COMPUTE_THREADS


def test_units_past_the_byte_bound_are_computed_one_at_a_time(make_models, tmp_path, monkeypatch):
    """With the bound below one unit's inputs, no two units are ever computed at once."""
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 64)
    monkeypatch.setattr(stream, "COMPUTE_BYTES_IN_FLIGHT", 1)
    dirs = make_models("llama", 3)
    busy, most = [0], [0]
    lock = threading.Lock()
    original = stream._compute_unit

    def counting(unit, tensors, kernel, device, turn=None):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            return original(unit, tensors, kernel, device, turn)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(stream, "_compute_unit", counting)
    splice.soup(dirs, tmp_path / "bounded", device="cpu", compute_threads=3)
    assert most[0] == 1
    monkeypatch.setattr(stream, "COMPUTE_BYTES_IN_FLIGHT", 1 << 40)
    splice.soup(dirs, tmp_path / "unbounded", device="cpu", compute_threads=3)
    assert most[0] >= 1  # not asserted > 1: threads may finish before the next unit arrives
    bounded, unbounded = load_dir(tmp_path / "bounded"), load_dir(tmp_path / "unbounded")
    assert all(torch.equal(bounded[n], unbounded[n]) for n in bounded)


@pytest.mark.parametrize("method", ["dare_ties", "della", "dare_linear"])
def test_drawing_methods_on_two_compute_threads_draw_and_merge_as_on_one(method, make_models, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 64)
    dirs = make_models("llama", 3)
    base, first, second = (str(d) for d in dirs)
    parameters = {"weight": 0.5, "density": 0.6, **({"epsilon": 0.1} if method == "della" else {})}
    recipe = tmp_path / f"{method}.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": base,
                "dtype": "float32",
                "models": [{"model": m, "parameters": parameters} for m in (first, second)],
                "parameters": {"rescale": True} if method != "della" else {},
            }
        )
    )
    threads, original = set(), stream._compute_unit

    def spy(unit, tensors, kernel, device, turn=None):
        threads.add(threading.current_thread().name)
        return original(unit, tensors, kernel, device, turn)

    monkeypatch.setattr(stream, "_compute_unit", spy)
    outputs, states = {}, {}
    for count in (1, 2):
        torch.manual_seed(1234)
        splice.merge(str(recipe), tmp_path / f"on-{count}", device="cpu", compute_threads=count)
        outputs[count], states[count] = load_dir(tmp_path / f"on-{count}"), torch.default_generator.get_state()
    assert len({t for t in threads if t.startswith("splice-compute")}) == 2  # two threads computed units
    assert outputs[1].keys() == outputs[2].keys()
    assert all(torch.equal(outputs[1][n], outputs[2][n]) for n in outputs[1])
    assert torch.equal(states[1], states[2])  # as many draws, made in the same order


def test_turns_are_given_in_ticket_order_and_given_up_once_drawn():
    from splice.tensors.turns import DrawingTurns, drawn

    turns, events = DrawingTurns(), []

    def unit(ticket: int, draws_then_merges: bool) -> None:
        with turns.taken(ticket):
            events.append(("draws", ticket))
            if draws_then_merges:
                drawn()
                held.wait(5)  # merging: the next ticket draws meanwhile
            events.append(("done", ticket))

    held = threading.Event()
    workers = [threading.Thread(target=unit, args=(t, t == 0)) for t in (2, 1, 0)]  # started out of order
    for worker in workers:
        worker.start()
    for _ in range(500):
        if ("draws", 2) in events:
            break
        threading.Event().wait(0.01)
    held.set()
    for worker in workers:
        worker.join(5)
    drawing = [ticket for kind, ticket in events if kind == "draws"]
    assert drawing == [0, 1, 2]
    assert events.index(("draws", 2)) < events.index(("done", 0))  # ticket 0 gave its turn up before it finished
    assert events.index(("done", 1)) < events.index(("draws", 2))  # ticket 1 never said drawn: held to its end


def test_a_turn_that_never_comes_is_one_clear_error():
    from splice.errors import SpliceError
    from splice.tensors.turns import DrawingTurns

    with pytest.raises(SpliceError, match="did not finish drawing in 0 s"):
        with DrawingTurns(wait_s=0.05).taken(1):
            pass


def test_della_finds_its_ranks_before_its_turn_to_draw(make_models, tmp_path, monkeypatch):
    """DELLA's sort of every row needs no draws: on several threads a unit finds its ranks before it waits for its
    turn, beside the other units' draws, on ranking threads of its own (the output equal to one thread's: the test
    above)."""
    import importlib

    import splice.tensors.turns as turns

    kernels = importlib.import_module("splice.merge.kernels")  # (`splice.merge` is also the function)
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 64)
    base, first, second = (str(d) for d in make_models("llama", 3))
    parameters = {"weight": 0.5, "density": 0.6, "epsilon": 0.1}
    recipe = tmp_path / "della.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "della",
                "base_model": base,
                "dtype": "float32",
                "models": [{"model": m, "parameters": parameters} for m in (first, second)],
            }
        )
    )
    found, ranking_threads = [], set()
    original, in_slices, sliced = kernels.ranks_in_slices, stream._computed_in_slices, threading.local()
    ranks_alone = importlib.import_module("splice.merge.ranks")._ranked_alone

    def ranks_in_slices(ranked, base_index, slices):
        if ranked and getattr(sliced, "now", False):  # (a tensor computed whole waits for its turn first)
            unit = getattr(turns._current, "unit", None)
            found.append(None if unit is None else unit.waited)
        return original(ranked, base_index, slices)

    def ranked_alone(delta):
        ranking_threads.add(threading.current_thread().name)
        return ranks_alone(delta)

    def computed_in_slices(*args, **kwargs):
        sliced.now = True
        try:
            return in_slices(*args, **kwargs)
        finally:
            sliced.now = False

    monkeypatch.setattr(kernels, "ranks_in_slices", ranks_in_slices)
    monkeypatch.setattr(importlib.import_module("splice.merge.ranks"), "_ranked_alone", ranked_alone)
    monkeypatch.setattr(stream, "_computed_in_slices", computed_in_slices)
    splice.merge(str(recipe), tmp_path / "merged", device="cpu", compute_threads=2)
    assert found and found == [False] * len(found)  # every unit found its ranks before it waited for its turn
    assert ranking_threads and all(name.startswith("splice-ranks") for name in ranking_threads)


def test_a_unit_waits_for_its_turn_when_it_draws_and_one_that_never_draws_does_not_wait():
    from splice.tensors.turns import DrawingTurns, drawn, my_turn

    turns, events, refused = DrawingTurns(wait_s=10), [], []
    two_done, one_ready = threading.Event(), threading.Event()

    def unit(ticket: int) -> None:
        with turns.taken(ticket, wait=False):
            if ticket == 2:  # draws nothing: ends at once, before the tickets ahead of it have drawn
                events.append(("done", 2))
                two_done.set()
                return
            if ticket == 0:  # draws once 2 has ended and 1 is waiting for its turn
                two_done.wait(5)
                one_ready.wait(5)
            events.append(("ready", ticket))
            if ticket == 1:
                one_ready.set()
            my_turn()
            events.append(("draws", ticket))
            drawn()
            try:
                my_turn()
            except RuntimeError as error:
                refused.append((ticket, str(error)))

    workers = [threading.Thread(target=unit, args=(t,)) for t in (3, 2, 1, 0)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert not any(worker.is_alive() for worker in workers)
    assert [ticket for kind, ticket in events if kind == "draws"] == [0, 1, 3]  # 3's turn came once 2 had ended
    assert events.index(("done", 2)) < events.index(("draws", 0))
    assert events.index(("ready", 1)) < events.index(("draws", 0))  # 1 got ready before its turn, then waited
    assert sorted(ticket for ticket, _ in refused) == [0, 1, 3]  # drawing again after `drawn` is refused
    assert all("drew after it said it had drawn" in message for _, message in refused)
