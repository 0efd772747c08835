"""Multi-stage recipes (mergekit-multi's files) with cached stages, and the card and recipe every merge output carries.

Three tiny Llamas A (the base), B and C; the recipe: s1 = ties of B and C on A, s2 = slerp of s1 and C, and the
final merge = linear of s2 and A. Each claim is checked against the stages run one by one with `splice.merge`, what
is read is observed by a spy on the checkpoint's reads, and the mergekit config is run by mergekit-yaml itself."""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pydantic
import pytest
import torch
import yaml

import splice
from splice.merge import recipe as recipes
from splice.merge.references import model_reference_marker
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.digest import checkpoint_digest
from splice.tensors.stream import Kernel, StreamReport

from conftest import perturbed, save, tiny_model
from helpers import load_dir, run_cli, run_mergekit


def stage_documents(a: str, b: str, c: str, t: float = 0.3, weight: float = 0.7) -> list[dict]:
    return [
        {
            "name": "s1",
            "merge_method": "ties",
            "base_model": a,
            "models": [
                {"model": b, "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": c, "parameters": {"weight": 0.5, "density": 0.7}},
            ],
        },
        {
            "name": "s2",
            "merge_method": "slerp",
            "base_model": "s1",
            "models": [{"model": "s1"}, {"model": c}],
            "parameters": {"t": t},
        },
        {
            "merge_method": "linear",
            "models": [{"model": "s2", "parameters": {"weight": weight}}, {"model": a, "parameters": {"weight": 0.25}}],
        },
    ]


def write(path: Path, documents: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def by_hand(documents: list[dict], workdir: Path, tag: str) -> Path:
    """The stages run one by one with splice.merge, each stage's name replaced by the directory it was written to."""
    written: dict[str, str] = {}
    out = workdir
    for number, document in enumerate(documents):
        resolved = yaml.safe_load(yaml.safe_dump(document))
        if resolved.get("base_model") in written:
            resolved["base_model"] = written[resolved["base_model"]]
        for entry in resolved["models"]:
            entry["model"] = written.get(entry["model"], entry["model"])
        out = workdir / f"{tag}-{number}"
        report = splice.merge(write(workdir / f"{tag}-{number}.yml", [resolved]), out, device="cpu")
        assert isinstance(report, StreamReport)  # one document, with a name or not: a plain merge
        written[document.get("name", "final")] = str(out)
    return out


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    mine, reference = load_dir(ours), load_dir(theirs)
    assert set(mine) == set(reference)
    for name in reference:
        assert torch.equal(mine[name], reference[name]), name


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")
    }


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The location of every checkpoint a tensor is read from (or copied from as stored), as it happens."""
    seen: list[str] = []
    read, byte_range = Checkpoint.read, Checkpoint.local_byte_range

    def spy_read(self, name, rows=None):
        seen.append(str(Path(self.location).resolve()))
        return read(self, name, rows)

    def spy_range(self, name):
        seen.append(str(Path(self.location).resolve()))
        return byte_range(self, name)

    monkeypatch.setattr(Checkpoint, "read", spy_read)
    monkeypatch.setattr(Checkpoint, "local_byte_range", spy_range)
    return seen


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("stages")
    base = tiny_model("llama", 0)
    a = str(save(base, root / "A", sharded=False))
    b = str(save(perturbed(base, 1), root / "B", sharded=True))
    c = str(save(perturbed(base, 2), root / "C", sharded=False))
    documents = stage_documents(a, b, c)
    recipe = write(root / "stages.yml", documents)
    report = splice.merge(recipe, root / "out", device="cpu")
    hand = by_hand(documents, root, "hand")
    return SimpleNamespace(root=root, a=a, b=b, c=c, documents=documents, recipe=recipe, report=report, hand=hand)


def workspace(work: SimpleNamespace, path: Path, **changes: float) -> tuple[Path, Path]:
    """A recipe file of its own (the stages with `changes`) and its output path."""
    return write(path / "stages.yml", stage_documents(work.a, work.b, work.c, **changes)), path / "out"


# -- the stages ----------------------------------------------------------------------------------


def test_three_stages_equal_the_stages_run_by_hand(work):
    assert [(s.name, s.status) for s in work.report.stages] == [("s1", "ran"), ("s2", "ran"), (None, "ran")]
    cache = work.root / "out.stages"
    assert work.report.cache == cache and sorted(p.name for p in cache.iterdir()) == ["s1", "s2"]
    assert_same_tensors(work.root / "out", work.hand)
    assert_same_tensors(cache / "s1", work.root / "hand-0")
    assert_same_tensors(cache / "s2", work.root / "hand-1")
    a = load_dir(Path(work.a))
    assert any(not torch.equal(load_dir(work.root / "out")[n], a[n]) for n in a)  # the merge did something


def test_a_rerun_reads_nothing_and_rewrites_nothing(work, reads):
    before = snapshot(work.root)
    report = splice.merge(work.recipe, work.root / "out", device="cpu")
    assert [(s.name, s.status) for s in report.stages] == [("s1", "reused"), ("s2", "reused"), (None, "up to date")]
    assert reads == []
    assert snapshot(work.root) == before


def test_documents_in_another_order_are_the_same_stages(work, tmp_path, reads):
    """mergekit-multi's files may name a stage before defining it; the order changes no key, so all is reused."""
    reordered = write(tmp_path / "reordered.yml", [work.documents[2], work.documents[1], work.documents[0]])
    report = splice.merge(reordered, work.root / "out", device="cpu")
    assert [s.status for s in report.stages] == ["reused", "reused", "up to date"] and reads == []


def test_editing_the_last_stage_recomputes_only_it(work, tmp_path, monkeypatch):
    recipe, out = workspace(work, tmp_path)
    splice.merge(recipe, out, device="cpu")
    cache = tmp_path / "out.stages"
    kept = snapshot(cache)
    recipe, _ = workspace(work, tmp_path, weight=0.4)
    seen: list[str] = []
    read = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, *a, **k: seen.append(self.location) or read(self, *a, **k))
    report = splice.merge(recipe, out, device="cpu", force=True)
    assert [s.status for s in report.stages] == ["reused", "reused", "ran"]
    assert {str(Path(p).resolve()) for p in seen} == {str(cache / "s2"), str(Path(work.a).resolve())}
    assert snapshot(cache) == kept
    final = yaml.safe_load(yaml.safe_dump(stage_documents(work.a, work.b, work.c, weight=0.4)[2]))
    final["models"][0]["model"] = str(work.root / "hand-1")
    splice.merge(write(tmp_path / "final.yml", [final]), tmp_path / "final-by-hand", device="cpu")
    assert_same_tensors(out, tmp_path / "final-by-hand")


def test_an_input_written_again_recomputes_the_stages_after_it(work, tmp_path):
    b = save(perturbed(tiny_model("llama", 0), 1), tmp_path / "B", sharded=True)
    recipe = write(tmp_path / "stages.yml", stage_documents(work.a, str(b), work.c))
    out = tmp_path / "out"
    splice.merge(recipe, out, device="cpu")
    save(perturbed(tiny_model("llama", 0), 5), b, sharded=True)  # B fine-tuned again: same names, shapes and sizes
    report = splice.merge(recipe, out, device="cpu", force=True)
    assert [s.status for s in report.stages] == ["ran", "ran", "ran"]
    assert_same_tensors(out, by_hand(stage_documents(work.a, str(b), work.c), tmp_path, "new-b"))


def test_a_changed_output_needs_force_before_anything_runs(work, tmp_path):
    recipe, out = workspace(work, tmp_path)
    splice.merge(recipe, out, device="cpu")
    recipe, _ = workspace(work, tmp_path, t=0.6)
    kept = snapshot(tmp_path)
    with pytest.raises(splice.OutputExistsError, match=r"already exists.*`force=True`"):
        splice.merge(recipe, out, device="cpu")
    assert snapshot(tmp_path) == kept  # s2 was not run into the cache either


def test_stage_runs_that_stage_and_what_it_needs(work, tmp_path, monkeypatch, capsys):
    recipe, _ = workspace(work, tmp_path)
    out = tmp_path / "just-s2"
    code, stdout, err = run_cli(
        ["merge", recipe, "--out", out, "--stage", "s2", "--device", "cpu", "--json"], monkeypatch, capsys
    )
    assert code == 0, err
    report = yaml.safe_load(stdout)  # JSON is YAML
    assert [(s["name"], s["status"]) for s in report["stages"]] == [("s1", "ran"), ("s2", "ran")]
    assert sorted(p.name for p in (tmp_path / "just-s2.stages").iterdir()) == ["s1"]
    assert_same_tensors(out, work.root / "hand-1")
    assert yaml.safe_load((out / "splice_stage.json").read_text())["stage"] == "s2"


def test_an_interrupted_stage_leaves_no_entry_a_rerun_trusts(work, tmp_path, monkeypatch):
    real_kernel = recipes.method_kernel

    def failing_kernel(method, *args, **kwargs):
        kernel = real_kernel(method, *args, **kwargs)
        if method != "slerp":
            return kernel
        calls = iter(range(10**6))

        def compute(name, tensors):
            if next(calls) == 5:
                raise RuntimeError("the machine went away")
            return kernel.compute(name, tensors)

        return Kernel(compute, kernel.elementwise, kernel.passes_through)

    recipe, out = workspace(work, tmp_path)
    cache = tmp_path / "out.stages"
    with monkeypatch.context() as patched:
        patched.setattr(recipes, "method_kernel", failing_kernel)
        with pytest.raises(RuntimeError, match="went away"):
            splice.merge(recipe, out, device="cpu")
    assert sorted(p.name for p in cache.iterdir()) == ["s1"] and not out.exists()  # no s2, no partial left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    report = splice.merge(recipe, out, device="cpu")
    assert [s.status for s in report.stages] == ["reused", "ran", "ran"]
    assert_same_tensors(out, work.hand)

    # an old entry of s2 whose recipe changed: interrupted, it stays the old one, which a rerun does not trust
    old_record = (cache / "s2" / "splice_stage.json").read_bytes()
    recipe, _ = workspace(work, tmp_path, t=0.6)
    with monkeypatch.context() as patched:
        patched.setattr(recipes, "method_kernel", failing_kernel)
        with pytest.raises(RuntimeError, match="went away"):
            splice.merge(recipe, out, device="cpu", force=True)
    assert (cache / "s2" / "splice_stage.json").read_bytes() == old_record
    assert sorted(p.name for p in cache.iterdir()) == ["s1", "s2"]
    report = splice.merge(recipe, out, device="cpu", force=True)
    assert [s.status for s in report.stages] == ["reused", "ran", "ran"]
    assert_same_tensors(out, by_hand(stage_documents(work.a, work.b, work.c, t=0.6), tmp_path, "t06"))


RECIPE_ERRORS = {
    "cycle": (
        [
            {"name": "s1", "merge_method": "linear", "models": [{"model": "s2", "parameters": {"weight": 1.0}}]},
            {"name": "s2", "merge_method": "linear", "models": [{"model": "s1", "parameters": {"weight": 1.0}}]},
            {"merge_method": "linear", "models": [{"model": "s2", "parameters": {"weight": 1.0}}]},
        ],
        [],
        r"stages use each other in a cycle \(s1 -> s2 -> s1\)",
    ),
    "itself": (
        [
            {"name": "s1", "merge_method": "linear", "models": [{"model": "s1", "parameters": {"weight": 1.0}}]},
            {"merge_method": "linear", "models": [{"model": "s1", "parameters": {"weight": 1.0}}]},
        ],
        [],
        r"cycle \(s1 -> s1\)",
    ),
    "duplicate": (
        [
            {"name": "s1", "merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1.0}}]},
            {"name": "s1", "merge_method": "linear", "models": [{"model": "s1", "parameters": {"weight": 1.0}}]},
        ],
        [],
        r"two documents are named 's1'; give each stage its own name",
    ),
    "two finals": (
        [
            {"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1.0}}]},
            {"merge_method": "linear", "models": [{"model": "B", "parameters": {"weight": 1.0}}]},
        ],
        [],
        r"two documents have no name; only the final merge may go without one",
    ),
    "unknown stage": (
        [
            {"name": "first", "merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1.0}}]},
            {"merge_method": "linear", "models": [{"model": "first", "parameters": {"weight": 1.0}}]},
        ],
        ["--stage", "frist"],
        r"--stage frist: \S+ has no stage of that name \(did you mean 'first'\?\); its stages are first",
    ),
    "a name that is a path": (
        [
            {"name": "../s1", "merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1.0}}]},
            {"merge_method": "linear", "models": [{"model": "../s1", "parameters": {"weight": 1.0}}]},
        ],
        [],
        r"\[\.\./s1\]: name '\.\./s1' is not a stage name",
    ),
    "a stage's own mistake": (
        [
            {"name": "s1", "merge_method": "tise", "models": [{"model": "A", "parameters": {"weight": 1.0}}]},
            {"merge_method": "linear", "models": [{"model": "s1", "parameters": {"weight": 1.0}}]},
        ],
        [],
        r"stages\.yml\[s1\]: unknown merge method 'tise' \(did you mean 'ties'\?\)",
    ),
}


@pytest.mark.parametrize("case", list(RECIPE_ERRORS))
def test_a_bad_multi_stage_file_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    documents, flags, message = RECIPE_ERRORS[case]
    recipe = write(tmp_path / "stages.yml", documents)
    code, _, err = run_cli(["merge", recipe, "--out", tmp_path / "out", *flags], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.yml"]


def test_the_cache_is_never_an_input_nor_a_directory_splice_did_not_write(work, tmp_path, monkeypatch, capsys):
    a = Path(work.a)
    documents = [
        {"name": a.name, "merge_method": "linear", "models": [{"model": work.a, "parameters": {"weight": 1.0}}]},
        {"merge_method": "linear", "models": [{"model": a.name, "parameters": {"weight": 1.0}}]},
    ]
    recipe = write(tmp_path / "stages.yml", documents)
    before = snapshot(a)
    for flags in ([], ["--force"]):  # stage A's directory would be its input A
        args = ["merge", recipe, "--out", tmp_path / "out", "-I", a.parent, *flags]
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"error: --intermediate-dir {a} is an input ({a}); writing there would destroy it" in err
    assert snapshot(a) == before

    foreign = tmp_path / "cache" / a.name
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine\n")
    for flags in ([], ["--force"]):  # a directory splice did not write is never replaced
        args = ["merge", recipe, "--out", tmp_path / "out", "-I", tmp_path / "cache", *flags]
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{a.name} is there and is no stage splice wrote; remove it or choose another --intermediate-dir" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and not (tmp_path / "out").exists()


def test_a_misspelt_stage_is_named_as_one(work, tmp_path, monkeypatch, capsys):
    documents = [work.documents[0], {**work.documents[2], "models": [{"model": "s_1", "parameters": {"weight": 1.0}}]}]
    recipe = write(tmp_path / "stages.yml", documents)
    code, _, err = run_cli(["merge", recipe, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    # s_1 is no directory, and as a Hub repo id it is not in the cache: both said, on the one line
    assert "'s_1' names no stage (did you mean 's1'?) and no model it can open: " in err
    assert "s_1 (revision main) is not a local directory, and not in the Hugging Face cache" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.yml"]


def test_every_field_that_names_a_model_is_marked_as_one():
    """Stage names are replaced in the fields `ModelReferenceField` marks: a recipe field that names a model and is
    not marked would keep a stage's name where its directory belongs."""
    seen, pending, unmarked = set(), [recipes.Recipe], []
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            nested = [field.annotation]
            while nested:
                annotation = nested.pop()
                if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
                    pending.append(annotation)
                nested.extend(typing.get_args(annotation))
            names_a_model = name in {"model", "base_model", "source", "tokenizer_source", "lora"}
            if names_a_model and model_reference_marker(field.annotation, field.metadata) is None:
                unmarked.append(f"{model.__name__}.{name}")
    assert unmarked == []
    assert len(seen) >= 3  # Recipe, InputModel, Conditional at least: the walk reached the nested models


def test_one_named_document_is_a_plain_merge_as_in_mergekit_yaml(work, tmp_path, monkeypatch, capsys):
    recipe = write(tmp_path / "one.yml", work.documents[:1])
    report = splice.merge(recipe, tmp_path / "out", device="cpu")
    assert isinstance(report, StreamReport) and not (tmp_path / "out" / "splice_stage.json").exists()
    assert_same_tensors(tmp_path / "out", work.root / "out.stages" / "s1")
    code, _, err = run_cli(["merge", recipe, "--out", tmp_path / "again", "--stage", "s2"], monkeypatch, capsys)
    assert code == 2 and "--stage s2: " in err and "its stages are s1" in err and len(err.strip().splitlines()) == 1


# -- what every output carries -------------------------------------------------------------------


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_names_the_inputs_and_their_digests(work):
    out, cache = work.root / "out", work.root / "out.stages"
    card = (out / "README.md").read_text()
    front = front_matter(card)
    assert front["library_name"] == "transformers" and front["tags"] == ["merge", "splice"]
    assert front["base_model"] == []  # local inputs: no Hub repository to name
    inputs = front["splice"]["inputs"]
    expected = [str(cache / "s2"), str(Path(work.a).resolve())]
    assert [entry["model"] for entry in inputs] == expected
    digests = [checkpoint_digest(Checkpoint.open(path)) for path in expected]
    assert [entry["digest"] for entry in inputs] == digests and len(set(digests)) == 2
    assert front["splice"]["version"] == splice.__version__ and front["splice"]["merge_method"] == "linear"
    for digest in digests:
        assert f"`{digest}`" in card  # the table under the front matter
    for stage in ("#### s1", "#### s2", "merge_method: ties", "merge_method: slerp", str(Path(work.b).resolve())):
        assert stage in card  # the stages that made the inputs
    s1_card = front_matter((cache / "s1" / "README.md").read_text())
    assert [entry["model"] for entry in s1_card["splice"]["inputs"]] == [
        str(Path(p).resolve()) for p in (work.b, work.c, work.a)
    ]


def test_a_digest_changes_when_a_file_is_written_again(work, tmp_path):
    copy = save(tiny_model("llama", 0), tmp_path / "A", sharded=False)
    before = checkpoint_digest(Checkpoint.open(copy))
    assert checkpoint_digest(Checkpoint.open(copy)) == before
    weights = copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert checkpoint_digest(Checkpoint.open(copy)) != before


def test_the_recipe_as_run_merges_again_to_the_same_tensors(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its paths are absolute: it runs from anywhere
    as_run = work.root / "out" / "splice_recipe.yml"
    assert yaml.safe_load(as_run.read_text())["models"][0]["model"] == str(work.root / "out.stages" / "s2")
    splice.merge(as_run, tmp_path / "again", device="cpu")
    assert_same_tensors(tmp_path / "again", work.root / "out")


def test_a_relative_single_recipe_is_recorded_with_absolute_paths(work, tmp_path, monkeypatch):
    monkeypatch.chdir(work.root)
    document = {"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 0.5}}]}
    document["models"].append({"model": "C", "parameters": {"weight": 0.5}})
    splice.merge(write(tmp_path / "relative.yml", [document]), tmp_path / "out", device="cpu")
    as_run = yaml.safe_load((tmp_path / "out" / "splice_recipe.yml").read_text())
    assert [m["model"] for m in as_run["models"]] == [str((work.root / n).resolve()) for n in ("A", "C")]
    monkeypatch.chdir(tmp_path)
    splice.merge(tmp_path / "out" / "splice_recipe.yml", tmp_path / "again", device="cpu")
    assert_same_tensors(tmp_path / "again", tmp_path / "out")


def test_the_mergekit_config_gives_mergekit_the_same_merge(work, tmp_path):
    config = work.root / "out" / "mergekit_config.yml"
    run_mergekit(config, tmp_path / "mergekit")
    theirs, ours = load_dir(tmp_path / "mergekit"), load_dir(work.root / "out")
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)


def test_no_mergekit_config_where_mergekit_cannot_run_the_recipe(work, tmp_path):
    memory = fsspec.filesystem("memory")
    remote = f"/splice-stages-test-{os.getpid()}/C"
    memory.put(str(Path(work.c)) + "/", remote, recursive=True)
    try:
        document = {
            "merge_method": "linear",
            "models": [
                {"model": work.a, "parameters": {"weight": 0.5}},
                {"model": f"memory://{remote}", "parameters": {"weight": 0.5}},
            ],
        }
        splice.merge(write(tmp_path / "remote.yml", [document]), tmp_path / "out", device="cpu")
    finally:
        memory.rm(remote.rsplit("/", 1)[0], recursive=True)
    assert not (tmp_path / "out" / "mergekit_config.yml").exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"No `mergekit_config.yml` is written: mergekit cannot read memory://{remote}." in card
    digests = [entry["digest"] for entry in front_matter(card)["splice"]["inputs"]]
    assert len(digests) == 2 and all(len(d) == 64 for d in digests)


def test_the_keys_splice_writes_for_mergekit_are_mergekits_own():
    """card.py keeps mergekit's config keys itself (importing mergekit.config costs seconds on every merge): they
    must be exactly the fields of mergekit's MergeConfiguration."""
    from mergekit.config import MergeConfiguration

    from splice.workflows.card import MERGEKIT_CONFIG_KEYS

    assert MERGEKIT_CONFIG_KEYS == set(MergeConfiguration.model_fields)
