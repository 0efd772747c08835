"""`splice patch merge`: LoRA-to-LoRA merges checked against merging the patched models themselves (splice.merge on
base + each adapter), against the SVD truncation error computed here, and against the adapters' factors read with
safetensors; layernorm, delta and mask merges against merging their patched models; lineage, base checks, refusals
and the command line."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import splice
from splice.adapters.apply import apply_patches
from splice.adapters.extract import extract_patch
from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.patch import Patch
from splice.errors import PatchError, RecipeError
from splice.merge.kernels import method_kernel
from splice.merge.recipe import ParameterResolver, parse_recipe
from splice.merge.task_vectors import TASK_VECTOR_METHODS, task_vector_merge
from splice.registry.store import Registry
from splice.tensors.checkpoint import Checkpoint

from conftest import TINY_DECODER, perturbed, save, tiny_model
from helpers import load_dir, run_cli

WEIGHTS = [1.0, 0.5, 0.7]
# Three PEFT LoRA adapters with random (non-zero) B: different targets, ranks, alphas, rsLoRA and patterns, so
# matrices are touched by one, two or three of them with different scales.
ADAPTERS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "down_proj", "gate_proj"],
        rank_pattern={"down_proj": 3},
        alpha_pattern={"gate_proj": 5},
    ),
    dict(r=4, lora_alpha=4, target_modules=["v_proj", "gate_proj"]),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The tiny Llama base, the three adapters, and the three patched models (base + each adapter, streamed)."""
    root = tmp_path_factory.mktemp("patch-merge")
    base = tiny_model("llama", 0)
    save(base, root / "base", sharded=False)
    adapters, tuned = [], []
    for index, config in enumerate(ADAPTERS):
        torch.manual_seed(10 + index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config))
        model.save_pretrained(root / f"adapter-{index}")
        adapters.append(root / f"adapter-{index}")
        apply_patches([adapters[-1]], root / "base", root / f"tuned-{index}")
        tuned.append(root / f"tuned-{index}")
    return root, root / "base", adapters, tuned


def full_merge(root: Path, base: Path, models: list[Path], method: str, parameters: dict, name: str, seed=None):
    """splice.merge of the patched models with the same method: what the merged patch must reproduce."""
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, WEIGHTS)],
        "parameters": parameters,
    }
    (root / f"{name}.yml").write_text(yaml.safe_dump(recipe))
    splice.merge(root / f"{name}.yml", root / name, seed=seed, device="cpu", force=True)
    return load_dir(root / name)


def applied(root: Path, base: Path, patch: Path, name: str) -> dict[str, torch.Tensor]:
    apply_patches([patch], base, root / name, device="cpu", force=True)
    return load_dir(root / name)


def peft_changes(adapter: Path) -> dict[str, torch.Tensor]:
    """stored weight name -> scale * B @ A in fp64, read from the adapter's files with safetensors and its config
    read here (PEFT's alpha / r, alpha / sqrt(r) with rsLoRA, rank_pattern and alpha_pattern by module suffix)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    state = load_file(adapter / "adapter_model.safetensors")
    changes = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        suffix = module.rsplit(".", 1)[-1]
        rank = (config.get("rank_pattern") or {}).get(suffix, config["r"])
        alpha = (config.get("alpha_pattern") or {}).get(suffix, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank
        assert a.shape[0] == rank
        changes[f"{module}.weight"] = scale * (b.double() @ a.double())
    return changes


def merged_products(patch_dir: Path) -> dict[str, torch.Tensor]:
    """weight name -> the merged patch's B @ A (its scale is 1: alpha = rank)."""
    patch = Patch.load(patch_dir)
    settings = patch.meta.settings
    products = {}
    for module, rank in settings["rank"].items():
        assert settings["alpha"][module] == rank and not settings["rslora"]
        products[f"{module}.weight"] = (
            patch.tensors[f"{module}.lora_B"].double() @ patch.tensors[f"{module}.lora_A"].double()
        )
    return products


def assert_states_close(ours: dict, theirs: dict, atol: float) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(
    "method, parameters, exact",
    [("linear", {}, True), ("task_arithmetic", {"lambda": 0.8}, True), ("ties", {"density": 0.6}, False)],
)
def test_lora_merge_at_full_rank_equals_merging_the_patched_models(family, method, parameters, exact):
    root, base, adapters, tuned = family
    out = root / f"merged-{method}"
    report = splice.merge_patches(
        adapters,
        out,
        method,
        weights=WEIGHTS,
        parameters=parameters,
        energy=None if exact else 1.0,  # ties: every singular value kept
        device="cpu",
    )
    expected = full_merge(root, base, tuned, method, parameters, f"full-{method}")
    assert_states_close(applied(root, base, out, f"applied-{method}"), expected, atol=1e-5)
    if exact:  # the factors concatenated: exact, rank = the sum of the ranks of the adapters that touch the matrix
        changes = [peft_changes(a) for a in adapters]
        products = merged_products(out)
        assert set(products) == set().union(*changes)
        scale = 0.8 if method == "task_arithmetic" else 1 / sum(WEIGHTS)  # linear normalises, task_arithmetic not
        ranks = {t.name: t.rank for t in report.tensors}
        for name, product in products.items():
            touching = [i for i, c in enumerate(changes) if name in c]
            expected_change = sum(scale * WEIGHTS[i] * changes[i][name] for i in touching)
            torch.testing.assert_close(product, expected_change, rtol=0, atol=1e-6, msg=name)
            assert ranks[name] == sum(_rank(adapters[i], name) for i in touching)
        assert {t.how for t in report.tensors} == {"concatenated"}
    else:
        assert {t.how for t in report.tensors} == {"full svd"}
        assert all(t.captured_energy > 1 - 1e-5 for t in report.tensors)


def _rank(adapter: Path, weight: str) -> int:
    module = weight.removesuffix(".weight")
    state = load_file(adapter / "adapter_model.safetensors")
    return state[f"base_model.model.{module}.lora_A.weight"].shape[0]


@pytest.mark.parametrize("method, parameters", [("ties", {"density": 0.6}), ("task_arithmetic", {})])
def test_lower_rank_error_is_the_svd_truncation_error(family, method, parameters):
    """ties: the change formed, merged and truncated; task_arithmetic: re-factored from the factors (QR + core SVD).
    Either way ||merged change - B A||_F is the truncation error of the full merged change's SVD."""
    root, base, adapters, tuned = family
    out = root / f"rank3-{method}"
    report = splice.merge_patches(adapters, out, method, weights=WEIGHTS, parameters=parameters, rank=3, device="cpu")
    expected = full_merge(root, base, tuned, method, parameters, f"full-rank3-{method}")
    base_state = load_dir(base)
    products = merged_products(out)
    captured = {t.name: t.captured_energy for t in report.tensors}
    ranks = {t.name: t.rank for t in report.tensors}
    assert ranks == {n: Patch.load(out).meta.settings["rank"][n[:-7]] for n in ranks}
    assert {t.how for t in report.tensors} == {"full svd" if method == "ties" else "qr + core svd"}
    for name, product in products.items():
        change = (expected[name] - base_state[name]).double()
        singular = torch.linalg.svdvals(change)
        assert product.shape == change.shape and ranks[name] == 3 < min(change.shape)
        truncation = float(singular[3:].square().sum().sqrt())
        error = float(torch.linalg.matrix_norm(change - product))
        assert error == pytest.approx(truncation, rel=1e-3, abs=2e-6), name
        assert truncation > 1e-3  # a real truncation, not a matrix of rank <= 3
        assert captured[name] == pytest.approx(float(singular[:3].square().sum() / singular.square().sum()), rel=1e-5)


def test_energy_picks_the_smallest_rank_that_keeps_it(family):
    root, base, adapters, tuned = family
    out = root / "energy"
    report = splice.merge_patches(adapters, out, "ties", weights=WEIGHTS, density=0.6, energy=0.9, device="cpu")
    expected = full_merge(root, base, tuned, "ties", {"density": 0.6}, "full-energy")
    base_state = load_dir(base)
    ranks = {t.name: t.rank for t in report.tensors}
    for name in ranks:
        squares = torch.linalg.svdvals((expected[name] - base_state[name]).double()).square()
        shares = torch.cumsum(squares, 0) / squares.sum()
        smallest = int((shares < 0.9).sum()) + 1
        assert ranks[name] == smallest, name
        assert Patch.load(out).meta.settings["rank"][name[:-7]] == smallest
    assert len(set(ranks.values())) > 1  # the rank is chosen per matrix


def test_dare_is_seeded_and_draws_as_the_method_does_on_the_formed_changes(family):
    """The same seed gives the same patch; it equals dare_ties run here by splice's kernel on the adapters' changes
    (read with safetensors, fp32), in the order the report lists the matrices, after seeding torch the same way; with
    density 1 nothing is dropped and the patch equals dare_linear on the patched models."""
    root, base, adapters, tuned = family
    runs = [
        splice.merge_patches(
            adapters, root / f"dare-{i}", "dare_ties", weights=WEIGHTS, density=0.5, seed=seed, energy=1.0, device="cpu"
        )
        for i, seed in enumerate([7, 7, 8])
    ]
    first, again, other = (merged_products(r.out) for r in runs)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    changes = [peft_changes(a) for a in adapters]
    recipe = parse_recipe(
        {
            "merge_method": "dare_ties",
            "base_model": "base",
            "models": [{"model": f"m{i}", "parameters": {"weight": w}} for i, w in enumerate(WEIGHTS)],
            "parameters": {"density": 0.5},
        }
    )
    names = [t.name for t in runs[0].tensors]
    kernel = method_kernel("dare_ties", ParameterResolver(recipe, names), base_index=3)
    torch.manual_seed(7)
    for name in names:
        shape = next(c[name].shape for c in changes if name in c)
        inputs = [c[name].float() if name in c else torch.zeros(shape) for c in changes] + [torch.zeros(shape)]
        torch.testing.assert_close(first[name], kernel.compute(name, inputs).double(), rtol=0, atol=1e-5, msg=name)
    out = root / "dare-dense"
    splice.merge_patches(adapters, out, "dare_linear", weights=WEIGHTS, density=1.0, seed=1, energy=1.0, device="cpu")
    expected = full_merge(root, base, tuned, "dare_linear", {"density": 1.0}, "full-dare", seed=1)
    assert_states_close(applied(root, base, out, "applied-dare"), expected, atol=1e-5)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A base, three fine-tunes of it, and another base (with a fine-tune of its own)."""
    root = tmp_path_factory.mktemp("patch-merge-extracted")
    base = tiny_model("llama", 0)
    save(base, root / "base", sharded=False)
    for seed in (1, 2, 3):
        save(perturbed(base, seed), root / f"tuned-{seed}", sharded=False)
    other = perturbed(base, 9, scale=0.01)
    save(other, root / "other-base", sharded=False)
    save(perturbed(other, 4), root / "other-tuned", sharded=False)
    return root


@pytest.mark.parametrize(
    "kind, method, options",
    [("layernorm", "ties", {}), ("delta", "dare_linear", {}), ("mask", "task_arithmetic", {"density": 0.3})],
)
def test_whole_tensor_patches_merge_as_their_patched_models_do(extracted, kind, method, options):
    """layernorm (changes taken from the base given), delta and sparse-delta mask patches: the merged patch applied
    equals the method run by splice.merge on base + each patch."""
    root = extracted
    patches, patched = [], []
    for seed in (1, 2, 3):
        patch_dir = root / f"{kind}-{seed}"
        extract_patch(root / "base", root / f"tuned-{seed}", kind, **options).save(patch_dir, force=True)
        patches.append(patch_dir)
        patched.append(root / f"{kind}-patched-{seed}")
        apply_patches([patch_dir], root / "base", patched[-1], force=True)
    parameters = {"density": 0.5} if method != "task_arithmetic" else {}
    out = root / f"{kind}-merged"
    report = splice.merge_patches(
        patches,
        out,
        method,
        weights=WEIGHTS,
        parameters=parameters,
        seed=3,
        base=root / "base",
        device="cpu",
        force=True,
    )
    assert report.kind == kind and {t.how for t in report.tensors} == {"whole tensor"}
    expected = full_merge(root, root / "base", patched, method, parameters, f"full-{kind}", seed=3)
    assert_states_close(applied(root, root / "base", out, f"applied-{kind}"), expected, atol=1e-5)
    assert Patch.load(out).meta.kind.value == kind


def test_lineage_and_the_shared_base_record(extracted):
    """The merged patch records each input's source and content digest (the digest the registry gives it when
    pushed, here checked by pushing one and merging it by ref) and a base record equal to fingerprinting the base
    for the tensors it changes, without being given the base."""
    root = extracted
    patches = []
    for seed in (1, 2):
        patches.append(root / f"lora-{seed}")
        extract_patch(root / "base", root / f"tuned-{seed}", "lora", rank=2).save(patches[-1], force=True)
    registry = Registry.init(str(root / "registry"))
    pushed = registry.push("third", extract_patch(root / "base", root / "tuned-3", "lora", rank=2)).manifest
    registry.push("first", patches[0])
    report = splice.merge_patches(
        [*patches, "third@1"], root / "lineage", "task_arithmetic", registry=registry, device="cpu", force=True
    )
    merged = Patch.load(root / "lineage")
    assert [i.source for i in report.inputs] == [str(patches[0]), str(patches[1]), "third@1"]
    assert report.inputs[0].digest == registry.resolve("first@1").digest
    assert report.inputs[2].digest == pushed.digest
    recorded = merged.meta.settings["merge"]["inputs"]
    assert [i["digest"] for i in recorded] == [i.digest for i in report.inputs]
    assert merged.meta.lineage[0] == str(root / "base")  # the base first, as extracted patches name it
    assert all(i.digest in merged.meta.lineage[-1] for i in report.inputs)
    touched = [f"{m}.weight" for m in merged.meta.settings["rank"]]
    assert merged.meta.base.digest == fingerprint_base(Checkpoint.open(root / "base"), touched).digest
    assert merged.check_base(Checkpoint.open(root / "base")) == []
    assert sum(merged.meta.settings["rank"].values()) == 3 * 2 * len(touched)
    exported = splice.export_peft(root / "lineage", root / "lineage-peft")  # its base found from the lineage
    assert (exported / "adapter_config.json").exists()


def test_patches_made_on_different_bases_are_refused_naming_a_tensor(extracted):
    root = extracted
    ours = root / "lora-ours"
    theirs = root / "lora-theirs"
    extract_patch(root / "base", root / "tuned-1", "lora", rank=2).save(ours, force=True)
    extract_patch(root / "other-base", root / "other-tuned", "lora", rank=2).save(theirs, force=True)
    with pytest.raises(
        PatchError, match=r"different bases: \S+\.weight: values differ: L2 norm [\d.]+, [\d.]+ on the base of patch 1"
    ) as caught:
        splice.merge_patches([ours, theirs], root / "refused", "linear")
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(
        PatchError, match=r"patch 2 .* is not the base this lora patch was made for: \S+\.weight: values differ"
    ):
        splice.merge_patches([ours, theirs], root / "refused", "linear", base=root / "base")
    assert not (root / "refused").exists()


def test_refusals_are_one_line_and_come_before_any_output(family, extracted):
    root, base, adapters, _ = family
    delta = extracted / "delta-one"
    extract_patch(extracted / "base", extracted / "tuned-1", "delta").save(delta, force=True)
    cases = [
        (dict(patches=[adapters[0], delta], method="linear"), PatchError, "is a delta patch and patch 1"),
        (dict(patches=adapters, method="ties", density=0.5), PatchError, "give `rank=R`"),
        (dict(patches=adapters, method="slerp"), RecipeError, "interpolates whole weights"),
        (dict(patches=adapters, method="tise"), RecipeError, "did you mean 'ties'"),
        (dict(patches=adapters, method="linear", weights=[1, 2]), RecipeError, "2 `weights` for 3 patches"),
        (dict(patches=[delta, delta], method="linear", rank=4), PatchError, "are for LoRA patches"),
        (dict(patches=adapters, method="linear", parameters={"normalize": False}), RecipeError, "task_arithmetic"),
        (dict(patches=[adapters[0], adapters[0]], method="linear", out=adapters[0]), Exception, "input"),
    ]
    for given, error, text in cases:
        given.setdefault("out", root / "never")
        with pytest.raises(error, match=re.escape(text)) as caught:
            splice.merge_patches(**given)
        assert len(str(caught.value).splitlines()) == 1, given
    assert not (root / "never").exists()
    bare = extracted / "bare-mask"
    extract_patch(extracted / "base", extracted / "tuned-1", "mask", density=0.2, mask_values=False).save(bare)
    lora = extracted / "lora-recorded"
    extract_patch(extracted / "base", extracted / "tuned-1", "lora", rank=2).save(lora)
    for given, text in [
        (dict(patches=[bare, bare], method="linear"), "is a bare mask"),
        (dict(patches=[lora, adapters[0]], method="linear"), "patch 2 (" + str(adapters[0]) + ") records no base"),
    ]:
        with pytest.raises(PatchError, match=re.escape(text)):
            splice.merge_patches(**given, out=root / "never")
    layernorm = extracted / "ln-one"
    extract_patch(extracted / "base", extracted / "tuned-1", "layernorm").save(layernorm, force=True)
    with pytest.raises(PatchError, match="give `base=MODEL_DIR`"):
        splice.merge_patches([layernorm, layernorm], root / "never", "linear")


def test_every_listed_method_merges_changes_as_it_merges_models():
    """The methods patch merges take give base + f(changes): run on base + changes they equal f on the changes over
    a zero base (up to rounding), with the same seed."""
    generator = torch.Generator().manual_seed(0)
    changes = [torch.randn(12, 10, generator=generator) * 0.01 for _ in range(3)]
    base = torch.randn(12, 10, generator=generator)
    for method in TASK_VECTOR_METHODS:
        count = 2 if method == "nuslerp" else 3
        merge = task_vector_merge(
            method, count, ["w"], parameters={"density": 0.6} if "density" in _params(method) else None
        )
        inputs = [c + base for c in changes[:count]]
        torch.manual_seed(5)
        on_models = merge.kernel.compute("w", inputs + ([base] if merge.base_index is not None else [])) - base
        torch.manual_seed(5)
        on_changes = merge.merged("w", [c.clone() for c in changes[:count]])
        torch.testing.assert_close(on_changes, on_models, rtol=0, atol=1e-5, msg=method)


def _params(method: str) -> set[str]:
    from splice.merge.methods import method_rules

    return set(method_rules(method).parameters)


def test_cli_merges_and_maps_errors_to_flags(family, monkeypatch, capsys):
    root, base, adapters, _ = family
    out = root / "cli-merged"
    code, stdout, stderr = run_cli(
        [
            "patch",
            "merge",
            *adapters,
            "--method",
            "ties",
            "--weights",
            "1,0.5,0.7",
            "--density",
            "0.6",
            "--rank",
            "3",
            "--base",
            base,
            "--out",
            out,
            "--device",
            "cpu",
            "--json",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["kind"] == "lora" and result["method"] == "ties" and len(result["inputs"]) == 3
    assert {t["rank"] for t in result["tensors"]} == {3}
    assert Patch.load(out).meta.base.digest == result["base_digest"]
    code, _, stderr = run_cli(
        ["patch", "merge", *adapters, "--method", "ties", "--out", root / "cli-refused"], monkeypatch, capsys
    )
    assert code == 2 and "--rank R" in stderr and "--energy E" in stderr
    code, stdout, stderr = run_cli(
        ["patch", "merge", *adapters, "--method", "task_arithmetic", "--param", "lambda=0.5", "--out", out, "--force"],
        monkeypatch,
        capsys,
    )
    assert code == 0, stderr
    assert "task_arithmetic merge of 3 lora patches" in stdout
    assert Patch.load(out).meta.settings["merge"]["parameters"] == {"lambda": "0.5"}


def test_a_gradient_is_placed_by_the_bases_depth(tmp_path):
    """Patches that change only layers 0 and 1 of a 4-layer model: a gradient's t comes from the model's depth (given
    by `base`), as the full merge places it; without the base a gradient is refused, not spread over 2 layers."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_DECODER, "num_hidden_layers": 4, "num_key_value_heads": 2})
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    adapters, tuned = [], []
    for i in range(2):
        torch.manual_seed(10 + i)
        lora = LoraConfig(
            init_lora_weights=False, r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[0, 1]
        )
        get_peft_model(copy.deepcopy(base), lora).save_pretrained(tmp_path / f"adapter{i}")
        adapters.append(tmp_path / f"adapter{i}")
        tuned.append(tmp_path / f"tuned{i}")
        splice.apply_patches([adapters[-1]], tmp_path / "base", tuned[-1], device="cpu")
    parameters = {"lambda": [0.0, 1.0]}
    with pytest.raises(RecipeError, match="lambda is a gradient across layers, which needs the model's depth"):
        splice.merge_patches(adapters, tmp_path / "no-base", "task_arithmetic", parameters=parameters, device="cpu")
    assert not (tmp_path / "no-base").exists()
    splice.merge_patches(
        adapters,
        tmp_path / "merged",
        "task_arithmetic",
        weights=WEIGHTS[:2],
        parameters=parameters,
        base=tmp_path / "base",
        device="cpu",
    )
    ours = applied(tmp_path, tmp_path / "base", tmp_path / "merged", "ours")
    theirs = full_merge(tmp_path, tmp_path / "base", tuned, "task_arithmetic", parameters, "full")
    assert_states_close(ours, theirs, atol=1e-6)
    layer_1 = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(ours[layer_1], load_dir(tmp_path / "base")[layer_1])  # t = 1/3 there: changed


def test_every_pair_of_bases_is_compared(tmp_path):
    """A on b0 changes q, B on b0 and C on b1 change v (b0 and b1 differ in v only): A's record samples v where B's
    and C's hash it whole, so comparing each with A alone would pass; B and C are compared too."""
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    b0 = tiny_model("llama", 0)
    config = b0.config
    b1 = transformers.LlamaForCausalLM(config)
    b1.load_state_dict(b0.state_dict())
    with torch.no_grad():
        b1.get_parameter(v).add_(0.5)
    b0.save_pretrained(tmp_path / "b0")
    b1.save_pretrained(tmp_path / "b1")

    def patch(base_model, base: str, name: str, tag: str, seed: int) -> Path:
        tuned = transformers.LlamaForCausalLM(config)
        tuned.load_state_dict(base_model.state_dict())
        with torch.no_grad():
            tuned.get_parameter(name).add_(
                torch.randn(tuned.get_parameter(name).shape, generator=torch.Generator().manual_seed(seed)) * 0.1
            )
        tuned.save_pretrained(tmp_path / f"tuned-{tag}")
        splice.extract_patch(tmp_path / base, tmp_path / f"tuned-{tag}", "delta").save(tmp_path / tag)
        return tmp_path / tag

    a, b, c = patch(b0, "b0", q, "A", 1), patch(b0, "b0", v, "B", 2), patch(b1, "b1", v, "C", 3)
    with pytest.raises(PatchError, match=r"patch 3 \(.*C\) and patch 2 \(.*B\) were made on different bases: "):
        splice.merge_patches([a, b, c], tmp_path / "out", "task_arithmetic", device="cpu")
    assert not (tmp_path / "out").exists()
