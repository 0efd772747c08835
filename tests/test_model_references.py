"""Model references as mergekit configs write them (issue 19): `base+lora` applies a PEFT adapter (or a splice patch)
on the fly, equal to merging what peft's `merge_and_unload()` saves; bare Hub repo ids (`org/name`, `@revision`,
`+lora` on them) are read from a Hugging Face cache built here in HF's layout, never from the network; a local
directory of the same name wins; every failure is one line naming the reference as written."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import torch
import transformers
import yaml
from huggingface_hub import scan_cache_dir
from peft import LoraConfig, get_peft_model

import splice
from splice.adapters.apply import apply_patches
from splice.adapters.extract import extract_patch
from splice.errors import CheckpointError, PatchError, RecipeError, SpliceError
from splice.merge.recipe import Recipe, parse_recipe
from splice.tensors.checkpoint import Checkpoint

from conftest import TINY_DECODER, perturbed, save, tiny_model
from helpers import load_dir, run_cli

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]
ROOT = Path(splice.__file__).parents[1]


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def peft_adapter(base: torch.nn.Module, directory: Path, seed: int = 0) -> torch.nn.Module:
    """A real peft LoRA adapter on `base`, factors randomised (B != 0), saved with save_pretrained; returns what
    peft's merge_and_unload() makes of it."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = quietly(get_peft_model, copy.deepcopy(base), config)
    model.save_pretrained(directory)
    return quietly(model.merge_and_unload)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def put_in_hub_cache(cache: Path, repo_id: str, revisions: dict[str, Path]) -> dict[str, str]:
    """Model directories laid out as huggingface_hub lays out a downloaded model repo (its cache-system guide):
    models--ORG--NAME/blobs/<sha256 of an LFS file, git blob id of another>, snapshots/<commit>/<file> a relative
    symlink to its blob, refs/<revision> holding the commit. Returns revision -> commit."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    commits = {}
    for revision, source in revisions.items():
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in sorted(source.iterdir()):
            data = file.read_bytes()
            blob = (
                folder
                / "blobs"
                / (hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else git_blob_id(data))
            )
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
        (folder / "refs" / revision).write_text(commit)
        commits[revision] = commit
    return commits


@dataclass
class World:
    root: Path
    base: Path
    lora: Path
    merged: Path  # base with the adapter merged by peft
    other: Path
    third: Path
    cache: Path
    commits: dict[str, str]  # org/tiny-base: main -> base, v1 -> other
    lora_commit: str


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("references")
    base = tiny_model("llama", 0)
    base_dir = save(base, root / "base", sharded=True)
    merged = peft_adapter(base, root / "lora")
    save(merged, root / "merged", sharded=False)
    other = save(perturbed(base, 1), root / "other", sharded=False)
    third = save(perturbed(base, 2), root / "third", sharded=False)
    cache = root / "hub"
    commits = put_in_hub_cache(cache, "org/tiny-base", {"main": base_dir, "v1": other})
    lora_commit = put_in_hub_cache(cache, "org/tiny-lora", {"main": root / "lora"})["main"]
    return World(root, base_dir, root / "lora", root / "merged", other, third, cache, commits, lora_commit)


@pytest.fixture
def hub(world, monkeypatch) -> Path:
    """The built cache as huggingface_hub's (HF_HUB_CACHE, read by huggingface_hub when it is imported, so its
    constant too), offline, and no socket can connect: nothing here may touch the network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(world.cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(world.cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return world.cache


def recipe(method: str, first: str, second: str, base: str | None = None) -> Recipe:
    parameters = {"weight": 0.6, "density": 0.7} if method == "ties" else {"weight": 0.6}
    models = [{"model": first, "parameters": parameters}, {"model": second, "parameters": {"weight": 0.4}}]
    if method == "ties":
        models[1]["parameters"]["density"] = 0.5
    return parse_recipe({"merge_method": method, "models": models, **({"base_model": base} if base else {})})


def merged(where: Path, name: str, method: str, first: str, second: str, base: str | None = None, **run):
    out = where / name
    splice.merge(recipe(method, first, second, base), out, device="cpu", **run)
    return load_dir(out)


def assert_states_close(ours: dict, theirs: dict, atol: float = 1e-6) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol, msg=name)


def assert_states_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def one_line(error: BaseException, *needles: str) -> str:
    text = str(error)
    assert len(text.strip().splitlines()) == 1, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_base_plus_lora_equals_merging_what_peft_merge_and_unload_saves(world, tmp_path, method, monkeypatch):
    base = str(world.third) if method == "ties" else None
    reads: list[tuple[str, tuple[int, int] | None]] = []
    read = Checkpoint.read

    def spy(self, name, rows=None):
        if type(self) is Checkpoint and Path(self.root) == world.base:
            reads.append((name, rows))
        return read(self, name, rows)

    monkeypatch.setattr(Checkpoint, "read", spy)
    # small blocks: the elementwise linear merge reads every tensor (LoRA-adapted ones too) as blocks of rows
    ours = merged(tmp_path, "ours", method, f"{world.base}+{world.lora}", str(world.other), base, chunk_bytes=256)
    monkeypatch.undo()
    theirs = merged(tmp_path, "theirs", method, str(world.merged), str(world.other), base)
    assert_states_close(ours, theirs)
    without = merged(tmp_path, "without", method, str(world.base), str(world.other), base)
    adapted = [n for n in theirs if not torch.equal(theirs[n], without[n])]
    assert len(adapted) == 2 * 2 + 2 + 2  # q, v and down per layer, embed_tokens, lm_head: what the adapter targets
    assert min(float((theirs[n] - without[n]).abs().max()) for n in adapted) > 1e-3
    adapted_reads = [rows for name, rows in reads if name in adapted]
    if method == "linear":  # each block of an adapted tensor computed from the same rows of W alone
        assert adapted_reads and all(rows is not None for rows in adapted_reads)


def test_the_mapping_form_of_a_reference_reads_as_its_string(world):
    def first_model(model) -> str:
        return parse_recipe({"merge_method": "linear", "models": [{"model": model}], "parameters": {"weight": 1}})

    assert first_model({"model": str(world.base), "lora": {"path": str(world.lora)}}).models[0].model == (
        f"{world.base}+{world.lora}"
    )
    pinned = {"model": {"path": "org/tiny-base", "revision": "v1"}, "lora": "org/tiny-lora@main"}
    assert first_model(pinned).models[0].model == "org/tiny-base@v1+org/tiny-lora@main"
    for bad, needle in [
        ({"model": "a", "override_architecture": "X"}, "override_architecture is not supported"),
        ({"model": "a", "lora": "b", "lorra": "c"}, "unknown key 'lorra'"),
        ({"lora": "b"}, "needs `model`"),
        ({"model": {"path": "a+b"}}, "cannot be a part of a model reference"),
    ]:
        with pytest.raises(RecipeError) as caught:
            first_model(bad)
        one_line(caught.value, "models.0.model", needle)


def test_a_splice_lora_patch_after_plus_equals_applying_it_first(world, tmp_path):
    tuned = perturbed(tiny_model("llama", 0), 9, 0.05)
    save(tuned, tmp_path / "tuned", sharded=False)
    extract_patch(world.base, tmp_path / "tuned", "lora", rank=2).save(tmp_path / "patch")
    apply_patches([tmp_path / "patch"], world.base, tmp_path / "applied", device="cpu")
    ours = merged(tmp_path, "ours", "linear", f"{world.base}+{tmp_path / 'patch'}", str(world.other), chunk_bytes=256)
    theirs = merged(tmp_path, "theirs", "linear", str(tmp_path / "applied"), str(world.other))
    assert_states_close(ours, theirs)
    # mergekit reads only PEFT adapters after `+`: no mergekit config is written for this recipe, and the card says why
    assert not (tmp_path / "ours" / "mergekit_config.yml").exists()
    assert "names a splice patch" in (tmp_path / "ours" / "README.md").read_text()
    assert (tmp_path / "theirs" / "mergekit_config.yml").exists()


def test_the_built_cache_is_one_huggingface_hub_reads(world):
    """The layout the tests below rely on, read by huggingface_hub's own cache scanner: both repos, their revisions
    and files, nothing reported as corrupted."""
    info = scan_cache_dir(world.cache)
    assert not info.warnings
    repos = {repo.repo_id: repo for repo in info.repos}
    assert set(repos) == {"org/tiny-base", "org/tiny-lora"}
    revisions = {r.commit_hash: r for r in repos["org/tiny-base"].revisions}
    assert {commit: set(revisions[commit].refs) for commit in world.commits.values()} == {
        world.commits["main"]: {"main"},
        world.commits["v1"]: {"v1"},
    }
    assert {f.file_name for f in revisions[world.commits["main"]].files} == {p.name for p in world.base.iterdir()}


def test_hub_ids_resolve_from_the_cache(world, hub, tmp_path):
    plain = merged(tmp_path, "plain", "linear", str(world.base), str(world.third))
    assert_states_equal(merged(tmp_path, "id", "linear", "org/tiny-base", str(world.third)), plain)
    assert_states_equal(merged(tmp_path, "main", "linear", "org/tiny-base@main", str(world.third)), plain)
    pinned = merged(tmp_path, "v1", "linear", "org/tiny-base@v1", str(world.third))
    assert_states_equal(pinned, merged(tmp_path, "other", "linear", str(world.other), str(world.third)))
    commit = merged(tmp_path, "commit", "linear", f"org/tiny-base@{world.commits['v1']}", str(world.third))
    assert_states_equal(commit, pinned)

    with_lora = merged(tmp_path, "lora", "linear", f"{world.base}+{world.lora}", str(world.third))
    assert_states_equal(
        merged(tmp_path, "id+lora", "linear", f"org/tiny-base+{world.lora}", str(world.third)), with_lora
    )
    both = merged(tmp_path, "id+id", "linear", "org/tiny-base@main+org/tiny-lora", str(world.third))
    assert_states_equal(both, with_lora)


def test_a_cache_snapshot_carries_its_blobs_and_nothing_else(world, hub, tmp_path, monkeypatch):
    """Side files of a snapshot are links to the repo's blobs, copied as the files they are; a link out of the blobs
    (nothing huggingface_hub writes) is refused as any symbolic link is."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": true}')
    cache = tmp_path / "hub"  # its own cache: the shared one stays as huggingface_hub writes caches
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    commit = put_in_hub_cache(cache, "org/linked", {"main": world.base})["main"]
    snapshot = cache / "models--org--linked" / "snapshots" / commit
    (snapshot / "tokenizer_config.json").symlink_to(secret)
    splice.merge(recipe("linear", "org/linked", str(world.third)), tmp_path / "out", device="cpu")
    assert (tmp_path / "out" / "config.json").read_bytes() == (world.base / "config.json").read_bytes()
    assert (tmp_path / "out" / "generation_config.json").is_file()
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()


def test_a_local_directory_shadows_a_repo_id_of_its_name(world, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(world.other, tmp_path / "org" / "tiny-base")
    local = merged(tmp_path, "local", "linear", "org/tiny-base", str(world.third))
    assert_states_equal(local, merged(tmp_path, "other", "linear", str(world.other), str(world.third)))
    with pytest.raises(CheckpointError) as caught:  # a directory has no revisions: never read one silently
        splice.merge(recipe("linear", "org/tiny-base@v1", str(world.third)), tmp_path / "out", device="cpu")
    one_line(caught.value, "org/tiny-base@v1", "is a local directory, which has no revision v1")


def test_what_is_not_in_the_cache_is_one_line_naming_it(world, hub, tmp_path):
    cache = str(world.cache)
    cases = [
        ("org/absent", CheckpointError, ["org/absent (revision main)", f"not in the Hugging Face cache at {cache}"]),
        ("org/tiny-base@v9", CheckpointError, ["revision v9 of org/tiny-base", cache, "(it holds main, v1)"]),
        (f"{world.base}+org/no-lora", PatchError, ["org/no-lora (revision main)", cache, "`hf download org/no-lora`"]),
    ]
    for reference, error, needles in cases:
        with pytest.raises(error) as caught:
            splice.merge(recipe("linear", reference, str(world.third)), tmp_path / "out", device="cpu")
        text = one_line(caught.value, f"model {reference}:", *needles)
        revision = reference.partition("@")[2]
        assert "hf download" in text and (not revision or f"--revision {revision}`" in text)
    assert not (tmp_path / "out").exists()


def test_hf_urls_offline_are_one_line(world, hub, tmp_path):
    with pytest.raises(CheckpointError) as caught:
        splice.merge(recipe("linear", "hf://org/tiny-base", str(world.third)), tmp_path / "out", device="cpu")
    one_line(caught.value, "hf://org/tiny-base", "HF_HUB_OFFLINE", "write its repo id (org/tiny-base)")


def foreign_adapter(where: Path, **config) -> Path:
    """A peft adapter made on a Llama shaped otherwise than the tiny base."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(TINY_DECODER | config)))
    peft_adapter(model, where)
    return where


def test_bad_adapters_are_one_line_naming_the_reference(world, tmp_path):
    wider = foreign_adapter(tmp_path / "wider", intermediate_size=32)
    deeper = foreign_adapter(tmp_path / "deeper", num_hidden_layers=3)
    drifted = tmp_path / "patch-of-other"
    extract_patch(world.other, world.third, "lora", rank=2).save(drifted)
    cases = [
        (f"{world.base}+{tmp_path / 'nothing'}", PatchError, ["adapter", "nothing not found"]),
        (f"{world.base}+{wider}", PatchError, ["down_proj", "as shape", "is it the adapter's base model?"]),
        (f"{world.base}+{deeper}", PatchError, ["model.layers.2.", "does not have"]),
        (f"{world.base}+{drifted}", PatchError, ["is not the base this lora patch was made for"]),
        (f"{world.base}+", RecipeError, ["nothing after '+'"]),
        (f"+{world.lora}", RecipeError, ["nothing before '+'"]),
        (f"{world.base}+{world.lora}+{world.lora}", RecipeError, ["more than one '+'"]),
        (f"{world.base}@", RecipeError, ["nothing after '@'"]),
    ]
    for reference, error, needles in cases:
        with pytest.raises(error) as caught:
            splice.merge(recipe("linear", reference, str(world.other)), tmp_path / "out", device="cpu")
        one_line(caught.value, f"model {reference}:", *needles)
    assert not (tmp_path / "out").exists()


def test_an_output_may_not_overlap_any_part_of_a_reference(world, hub, tmp_path):
    reference = f"{world.base}+{world.lora}"
    for out, named in [(world.lora / "out", world.lora), (world.base, world.base)]:
        with pytest.raises(SpliceError) as caught:
            splice.merge(recipe("linear", reference, str(world.other)), out, device="cpu", force=True)
        one_line(caught.value, f"({named})", "writing there would destroy it")
    repo = world.cache / "models--org--tiny-base"
    with pytest.raises(SpliceError) as caught:
        splice.merge(recipe("linear", "org/tiny-base", str(world.other)), repo / "out", device="cpu", force=True)
    one_line(caught.value, f"({repo})", "writing there would destroy it")
    assert sorted(p.name for p in world.lora.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_splice_merge_on_the_command_line_reads_the_cache_offline(world, tmp_path):
    """A real process with HF_HUB_CACHE and HF_HUB_OFFLINE set as a user sets them: a Hub id with an adapter, a
    pinned Hub id as the base, mergekit's mapping form, relative paths."""
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": {"model": {"path": "org/tiny-base", "revision": "v1"}},
                "models": [
                    {"model": "org/tiny-base+../lora", "parameters": {"weight": 0.6, "density": 0.7}},
                    {"model": "../third", "parameters": {"weight": 0.4, "density": 0.5}},
                ],
            }
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_CACHE": str(world.cache),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # were anything to ask the Hub, it would fail, not reach it
    }
    workdir = world.root / "work"
    workdir.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "splice", "merge", str(recipe_file), "--out", str(tmp_path / "out"), "--quiet"]
    result = subprocess.run(
        [*command, "--device", "cpu"], capture_output=True, text=True, timeout=180, env=env, cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    theirs = merged(tmp_path, "theirs", "ties", str(world.merged), str(world.third), str(world.other))
    assert_states_close(load_dir(tmp_path / "out"), theirs)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (world.other / "config.json").read_text()
    )


def test_what_the_cache_lacks_is_one_line_on_the_command_line(world, hub, tmp_path, monkeypatch, capsys):
    recipe_file = tmp_path / "recipe.yml"
    models = [{"model": "org/gone+org/tiny-lora"}, {"model": str(world.third)}]
    recipe_file.write_text(yaml.safe_dump({"merge_method": "linear", "models": models, "parameters": {"weight": 1}}))
    code, _, err = run_cli(["merge", recipe_file, "--out", tmp_path / "out", "--device", "cpu"], monkeypatch, capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "org/gone (revision main)" in err and "hf download org/gone" in err and str(world.cache) in err
    assert not (tmp_path / "out").exists()


SWEEP_HOOK = textwrap.dedent("""
    from pathlib import Path

    from safetensors.torch import load_file

    TARGET = load_file({target!r})


    def score(state, model_dir):
        assert (Path(model_dir) / "config.json").is_file(), model_dir
        return -sum(float(((state[k].double() - TARGET[k].double()) ** 2).sum()) for k in TARGET)
""")


def run_sweep(where: Path, search: dict, hook: Path, recipe_document: dict | None = None):
    where.mkdir(parents=True)
    document = {"search": search, "evaluate": {"hook": f"{hook}:score"}, "out": str(where / "out")}
    if recipe_document is not None:
        document["recipe"] = recipe_document
    (where / "sweep.yml").write_text(yaml.safe_dump(document))
    return splice.sweep(where / "sweep.yml", workers=1, run=splice.RunOptions(device="cpu"))


def test_sweeps_read_references(world, tmp_path, monkeypatch):
    """A greedy soup whose ingredient is `base+lora` (its same-tensors check, its soups), and a searched recipe
    with one (mergekit's mapping form, relative paths): each equals the same sweep over peft's merged model."""
    monkeypatch.chdir(world.root)
    hook = tmp_path / "hook.py"
    hook.write_text(SWEEP_HOOK.format(target=str(world.merged / "model.safetensors")))  # the adapted model is best
    variants = [("references", "base+lora", {"model": "base", "lora": "lora"}), ("merged", "merged", "merged")]
    reports = {}
    for name, ingredient, model in variants:
        greedy = {"method": "greedy_soup", "ingredients": [ingredient, "other"]}
        reports[name, "greedy"] = run_sweep(tmp_path / name / "greedy", greedy, hook)
        document = {
            "merge_method": "linear",
            "models": [
                {"model": model, "parameters": {"weight": {"search": "choice", "values": [0.2, 0.8]}}},
                {"model": "other", "parameters": {"weight": 0.5}},
            ],
        }
        reports[name, "grid"] = run_sweep(tmp_path / name / "grid", {"method": "grid"}, hook, document)
    for kind in ("greedy", "grid"):
        ours = load_dir(tmp_path / "references" / kind / "out" / "best")
        assert_states_close(ours, load_dir(tmp_path / "merged" / kind / "out" / "best"))
    assert [t.score for t in reports["references", "grid"].trials] == pytest.approx(
        [t.score for t in reports["merged", "grid"].trials], rel=1e-6
    )
    assert len(reports["references", "grid"].trials) == 2
    assert all(t.score is not None for t in reports["references", "grid"].trials)
    greedy = reports["references", "greedy"].greedy
    assert not greedy.failed and greedy.kept[0] == f"{world.base}+{world.lora}"  # recorded absolute
    assert greedy.scores == pytest.approx({f"{world.base}+{world.lora}": 0.0, str(world.other): mock.ANY}, abs=1e-6)


def test_a_sweep_pushes_only_against_a_stored_base(world, tmp_path):
    document = {
        "merge_method": "task_arithmetic",
        "base_model": f"{world.base}+{world.lora}",
        "models": [{"model": str(world.other), "parameters": {"weight": {"search": "choice", "values": [0.5, 1]}}}],
    }
    sweep = {
        "recipe": document,
        "search": {"method": "grid"},
        "evaluate": {"hook": f"{tmp_path / 'hook.py'}:score"},
        "push": {"name": "best", "registry": str(tmp_path / "registry")},
        "out": str(tmp_path / "out"),
    }
    (tmp_path / "hook.py").write_text("def score(state):\n    return 0.0\n")
    (tmp_path / "sweep.yml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(SpliceError) as caught:
        splice.sweep(tmp_path / "sweep.yml", workers=1, run=splice.RunOptions(device="cpu"))
    one_line(caught.value, "push.base", f"{world.base}+{world.lora} is a model with an adapter applied on the fly")
    assert not (tmp_path / "out").exists()


def test_the_digest_of_base_plus_lora_changes_with_the_adapter(world, tmp_path):
    """A stage cache keys `base+lora` by its digest: rewriting the adapter (same names and shapes, new values) must
    change it, or a stage would be reused with the old adapter's tensors."""
    from splice.tensors.digest import checkpoint_digest
    from splice.workflows.references import open_reference

    lora = tmp_path / "lora"
    shutil.copytree(world.lora, lora)
    reference = f"{world.base}+{lora}"
    before = checkpoint_digest(open_reference(reference))
    assert checkpoint_digest(open_reference(reference)) == before
    peft_adapter(tiny_model("llama", 0), lora, seed=1)  # written again in place: other factors
    assert checkpoint_digest(open_reference(reference)) != before
    assert checkpoint_digest(open_reference(str(world.base))) == checkpoint_digest(Checkpoint.open(world.base))
