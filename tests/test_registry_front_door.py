"""The registry's front door: short digests as refs, PEFT adapters published through
splice.workflows.publish, and registry commands that only move bytes staying free of torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from test_registry import REPO, make_patch

from splice.registry import RefError, Registry, RegistryError, manifest, parse_ref, store
from splice.workflows.publish import publish_patch

from conftest import save, tiny_model
from helpers import run_cli


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry.init(tmp_path / "registry")


def test_a_short_digest_as_ls_prints_it_resolves_when_unique(registry, monkeypatch, capsys):
    first = registry.push("task", make_patch(0)).manifest
    second = registry.push("task", make_patch(1)).manifest
    again = registry.push("task", make_patch(0)).manifest  # the content of version 1 again: the newest such is taken
    short = second.digest[:19]  # sha256: + 12 hex digits, as `registry ls NAME` and the deploy table print it
    assert registry.resolve(f"task@{short}").version == 2
    assert registry.resolve(f"task@{second.digest[:15]}").version == 2  # 8 hex digits are enough
    assert registry.resolve(f"task@{first.digest[:19]}").version == again.version == 3
    assert registry.resolve(f"task@{first.digest}").version == 3  # as a whole digest does

    monkeypatch.setenv("SPLICE_REGISTRY", str(registry.url))
    code, out, err = run_cli(["registry", "show", f"task@{short}"], monkeypatch, capsys)
    assert code == 0 and "task@2" in out, err


def test_an_ambiguous_short_digest_is_a_one_line_error_naming_the_versions(registry, monkeypatch):
    real = manifest.content_digest

    def shared_prefix(meta, tensors):  # two contents whose digests begin alike, as 1 in 4 billion pairs do
        return "sha256:0123abcd" + real(meta, tensors)[15:]

    monkeypatch.setattr(manifest, "content_digest", shared_prefix)
    monkeypatch.setattr(store, "content_digest", shared_prefix)
    registry.push("task", make_patch(0))
    registry.push("task", make_patch(1))
    with pytest.raises(RegistryError) as caught:
        registry.resolve("task@sha256:0123abcd")
    message = str(caught.value)
    assert "\n" not in message
    assert "digest sha256:0123abcd of task is ambiguous" in message and "task@1" in message and "task@2" in message
    assert registry.resolve(f"task@{registry.resolve('task@2').digest[:24]}").version == 2  # more digits: unique


def test_a_short_digest_matching_no_version_and_malformed_ones_are_refused(registry):
    registry.push("task", make_patch(0))
    with pytest.raises(RegistryError, match="task has no version with content digest sha256:00000000$"):
        registry.resolve("task@sha256:00000000")
    for text in ("task@sha256:0123abc", "task@sha256:" + "0" * 40, "task@sha256:0123ABCD"):
        with pytest.raises(RefError, match="64 lowercase hex digits, or the first 8 to 32"):
            parse_ref(text)


def test_a_peft_adapter_is_published_with_its_base_fingerprinted(registry, tmp_path):
    import warnings

    from peft import LoraConfig, get_peft_model

    base = tiny_model("bert", 0)
    base_dir = save(base, tmp_path / "base", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
        adapted.save_pretrained(tmp_path / "adapter")
    with pytest.raises(RegistryError, match="pass `base=MODEL_DIR`"):
        publish_patch(registry, "peft", tmp_path / "adapter")
    with pytest.raises(RefError, match="patch name 'Bad' is not allowed"):
        publish_patch(registry, "Bad", tmp_path / "no-such-adapter")  # refused before anything is read
    pushed = publish_patch(registry, "peft", tmp_path / "adapter", base=str(base_dir), alias="prod").manifest
    assert pushed.ref == "peft@1" and pushed.meta.base is not None
    assert registry.resolve("peft@prod").digest == pushed.digest
    assert registry.names() == ["peft"]


MOVE_BYTES = textwrap.dedent("""
    import sys
    from splice.cli.app import app  # the real entry point's app, with the real lazy splice package
    url = sys.argv[2]
    for args in (["init"], ["ls"], ["ls", "task"], ["tag", "task@1", "prod"], ["diff", "task@1", "task@1"],
                 ["verify"], ["gc", "--grace", "0"], ["rm", "task@2"]):
        try:
            app(["registry", *args, "--registry", url], standalone_mode=False)
        except SystemExit as exc:
            assert not exc.code, (args, exc.code)
    heavy = sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules)
    print("heavy:", heavy)
""")


def test_registry_commands_that_only_move_bytes_import_no_torch(registry, tmp_path):
    registry.push("task", make_patch(0))
    registry.push("task", make_patch(1))
    done = subprocess.run(
        [sys.executable, "-c", MOVE_BYTES, str(REPO), str(registry.url)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout, done.stdout
    assert "removed task@2" in done.stdout and "alias prod of task -> version 1" in done.stdout


def test_splice_registry_ls_and_help_import_no_torch(registry, tmp_path):
    registry.push("task", make_patch(0))
    for args in (["--help"], ["registry", "ls", "--registry", str(registry.url)]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "splice", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert "splice.cli.app" in imported
        assert not imported & {"torch", "transformers", "safetensors", "numpy"}, args
