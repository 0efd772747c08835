"""OT fusion (Imfeld et al.): permutation recovery, identity, heterogeneous widths, N models, errors, CLI.

The permuted and widened copies are built here from the live models' own module names, independently of the
fusion engine's architecture descriptions: a copy whose residual dimensions, attention heads (and the
dimensions inside them) and MLP neurons are permuted computes exactly the same function, and so does a copy
whose every width is doubled by duplicating neurons (their outgoing weights halved).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

import splice
from splice.errors import IncompatibleModelsError, SpliceError
from splice.merge.fusion import REPORT_FILE, FusionOptions, FusionReport

from conftest import example_inputs, model_class, save, tiny_model
from helpers import load_dir, run_cli

ATOL = 1e-5

# Per live parameter name: what each dimension indexes. "res": residual stream; "qk"/"v": attention neurons
# (head-major) of queries+keys / values; "qkv": GPT-2's fused [q | k | v]; "mlp": MLP hidden units; "pool":
# pooler outputs; "" a fixed axis. A trailing "<" marks an axis a layer reads from (its input).
AXES = {
    "vit": [
        (r".*embeddings\.(cls_token|position_embeddings)", ("", "", "res")),
        (r".*patch_embeddings\.projection\.weight", ("res", "", "", "")),
        (r".*patch_embeddings\.projection\.bias", ("res",)),
        (r".*layernorm.*", ("res",)),
        (r".*attention\.(q|k)_proj\.weight", ("qk", "res<")),
        (r".*attention\.(q|k)_proj\.bias", ("qk",)),
        (r".*attention\.v_proj\.weight", ("v", "res<")),
        (r".*attention\.v_proj\.bias", ("v",)),
        (r".*attention\.o_proj\.weight", ("res", "v<")),
        (r".*attention\.o_proj\.bias", ("res",)),
        (r".*mlp\.fc1\.weight", ("mlp", "res<")),
        (r".*mlp\.fc1\.bias", ("mlp",)),
        (r".*mlp\.fc2\.weight", ("res", "mlp<")),
        (r".*mlp\.fc2\.bias", ("res",)),
        (r"classifier\.weight", ("", "res<")),
        (r"classifier\.bias", ("",)),
        (r"pooler\.dense\.weight", ("pool", "res<")),
        (r"pooler\.dense\.bias", ("pool",)),
    ],
    "bert": [
        (r".*embeddings\.\w+_embeddings\.weight", ("", "res")),
        (r".*LayerNorm\.(weight|bias)", ("res",)),
        (r".*attention\.self\.(query|key)\.weight", ("qk", "res<")),
        (r".*attention\.self\.(query|key)\.bias", ("qk",)),
        (r".*attention\.self\.value\.weight", ("v", "res<")),
        (r".*attention\.self\.value\.bias", ("v",)),
        (r".*attention\.output\.dense\.weight", ("res", "v<")),
        (r".*attention\.output\.dense\.bias", ("res",)),
        (r".*intermediate\.dense\.weight", ("mlp", "res<")),
        (r".*intermediate\.dense\.bias", ("mlp",)),
        (r".*\.output\.dense\.weight", ("res", "mlp<")),
        (r".*\.output\.dense\.bias", ("res",)),
        (r".*pooler\.dense\.weight", ("pool", "res<")),
        (r".*pooler\.dense\.bias", ("pool",)),
        (r"classifier\.weight", ("", "pool<")),
        (r"classifier\.bias", ("",)),
    ],
    "gpt2": [
        (r".*(wte|wpe)\.weight", ("", "res")),
        (r"lm_head\.weight", ("", "res<")),
        (r".*ln_(1|2|f)\.(weight|bias)", ("res",)),
        (r".*attn\.c_attn\.weight", ("res<", "qkv")),
        (r".*attn\.c_attn\.bias", ("qkv",)),
        (r".*attn\.c_proj\.weight", ("v<", "res")),
        (r".*attn\.c_proj\.bias", ("res",)),
        (r".*mlp\.c_fc\.weight", ("res<", "mlp")),
        (r".*mlp\.c_fc\.bias", ("mlp",)),
        (r".*mlp\.c_proj\.weight", ("mlp<", "res")),
        (r".*mlp\.c_proj\.bias", ("res",)),
    ],
}


def axes_of(arch: str, name: str) -> tuple[str, ...]:
    for pattern, axes in AXES[arch]:
        if re.fullmatch(pattern, name):
            return axes
    raise AssertionError(f"test does not know {name}")


def layer_of(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def widths(model) -> tuple[int, int, int]:
    config = model.config
    if config.model_type == "gpt2":
        return config.n_embd, config.n_head, config.n_inner or 4 * config.n_embd
    return config.hidden_size, config.num_attention_heads, config.intermediate_size


def transform(model, arch: str, indices, scale_inputs: float = 1.0, config=None):
    """A copy whose every axis labelled L is re-indexed by indices(L, layer); input axes scaled."""
    state = {}
    for name, tensor in model.state_dict().items():
        for dim, label in enumerate(axes_of(arch, name)):
            if label:
                index = indices(label.rstrip("<"), layer_of(name))
                tensor = tensor.index_select(dim, index)
                if label.endswith("<"):
                    tensor = tensor * scale_inputs
        state[name] = tensor
    copy = type(model)(config or model.config)
    copy.load_state_dict(state)
    return copy.eval()


def permuted_copy(model, arch: str, seed: int, residual: bool = True):
    """Same function: residual dims, heads, dims within heads (Q/K jointly, V apart) and MLP units permuted."""
    generator = torch.Generator().manual_seed(seed)
    hidden, heads, inner = widths(model)
    size = hidden // heads
    perms: dict[tuple[str, int | None], torch.Tensor] = {}

    def within_heads(layer: int | None) -> torch.Tensor:
        """Heads move together for Q, K and V; dims inside a head move jointly for Q/K and apart for V."""
        if ("heads", layer) not in perms:
            shift = int(torch.randint(1, heads, (), generator=generator))  # every head moves
            perms[("heads", layer)] = (torch.arange(heads) + shift) % heads
        order = perms[("heads", layer)]
        return torch.cat([order[h] * size + torch.randperm(size, generator=generator) for h in range(heads)])

    def indices(label: str, layer: int | None) -> torch.Tensor:
        key = (label, None if label in ("res", "pool") else layer)
        if key not in perms:
            if label == "qkv":
                qk, v = indices("qk", layer), indices("v", layer)
                perms[key] = torch.cat([qk, qk + hidden, v + 2 * hidden])
            elif label in ("qk", "v"):
                perms[key] = within_heads(layer)
            elif label == "res" and not residual:
                perms[key] = torch.arange(hidden)
            else:
                perms[key] = torch.randperm(inner if label == "mlp" else hidden, generator=generator)
        return perms[key]

    return transform(model, arch, indices)


def widened_copy(model, arch: str):
    """Every width doubled (heads doubled, head size kept) by duplicating neurons; inputs halved: same function."""
    hidden, heads, inner = widths(model)
    config = model.config.to_dict()
    config.update(hidden_size=2 * hidden, num_attention_heads=2 * heads, intermediate_size=2 * inner)
    config = type(model.config).from_dict(config)

    def indices(label: str, layer: int | None) -> torch.Tensor:
        size = inner if label == "mlp" else hidden
        if label == "qkv":
            raise AssertionError("GPT-2 widening is not built here")
        return torch.arange(size).repeat(2)

    return transform(model, arch, indices, scale_inputs=0.5, config=config)


def fusion_data(arch: str, count: int = 60) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    if arch == "vit":
        return {"pixel_values": torch.rand(count, 1, 8, 8, generator=generator)}
    ids = torch.randint(0, 64, (count, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[: count // 2, 7:] = 0  # padded tails are dropped from the activations
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model, arch: str) -> torch.Tensor:
    return model.eval()(**example_inputs(arch)).logits


def load(arch: str, directory: Path):
    return model_class(arch).from_pretrained(directory).eval()


@pytest.mark.parametrize("align", ["activations", "weights"])
@pytest.mark.parametrize("arch", ["vit", "bert", "gpt2"])
def test_permuted_copy_is_recovered_exactly(tmp_path, arch, align):
    original = tiny_model(arch, 0).eval()
    permuted = permuted_copy(original, arch, seed=1)
    assert torch.allclose(logits(permuted, arch), logits(original, arch), atol=ATOL)  # function unchanged
    matrices = {name: tensor for name, tensor in original.state_dict().items() if tensor.dim() >= 2}
    assert all(not torch.equal(permuted.state_dict()[name], tensor) for name, tensor in matrices.items())
    a, b = save(original, tmp_path / "a", False), save(permuted, tmp_path / "b", sharded=True)
    report = splice.fuse([a, b], tmp_path / "fused", data=fusion_data(arch), align=align, device="cpu")
    fused = load(arch, tmp_path / "fused")
    assert torch.allclose(logits(fused, arch), logits(original, arch), atol=ATOL)
    solved = [m for m in report.maps if m.kind == "ot"]
    assert solved and all(m.permutation_closeness == pytest.approx(1.0) for m in report.maps)
    heads = [m for m in solved if m.cross_head_mass is not None]
    assert len(heads) == 3 * 2  # q, k, v in both layers
    assert all(m.head_split_mass == pytest.approx(0.0, abs=1e-9) for m in heads)  # whole heads moved
    assert any(m.cross_head_mass > 0 for m in heads)
    saved = json.loads((tmp_path / "fused" / REPORT_FILE).read_text())
    assert saved["architecture"] == type(original).__name__ and len(saved["maps"]) == len(report.maps)
    assert {layer["layer"] for layer in saved["layers"]} == {"embeddings", "layer 0", "layer 1", "head"} - (
        {"head"} if arch != "bert" else set()
    )


BACKBONES = {"vit": transformers.ViTModel, "bert": transformers.BertModel, "gpt2": transformers.GPT2Model}


@pytest.mark.parametrize("arch", ["vit", "bert", "gpt2"])
def test_bare_backbones_recover_a_permutation(tmp_path, arch):
    """ViTModel, BertModel (both with their pooler) and GPT2Model: checkpoints without a task head or prefix."""
    backbone = BACKBONES[arch]
    torch.manual_seed(0)
    original = backbone(tiny_model(arch, 0).config).eval()
    a, b = save(original, tmp_path / "a", False), save(permuted_copy(original, arch, seed=5), tmp_path / "b", False)
    splice.fuse([a, b], tmp_path / "fused", data=fusion_data(arch), device="cpu")
    fused = backbone.from_pretrained(tmp_path / "fused").eval()
    with torch.no_grad():
        want, got = original(**example_inputs(arch)), fused(**example_inputs(arch))
    assert torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=ATOL)
    if arch != "gpt2":
        assert torch.allclose(got.pooler_output, want.pooler_output, atol=ATOL)


def test_three_models_average_with_equal_weights(tmp_path):
    original = tiny_model("bert", 0).eval()
    dirs = [save(original, tmp_path / "m0", False)]
    dirs += [save(permuted_copy(original, "bert", seed), tmp_path / f"m{seed}", False) for seed in (1, 2)]
    report = splice.fuse(dirs, tmp_path / "fused", data=fusion_data("bert"), anchor=2, device="cpu")
    # the anchor is a permuted copy: the fused model is that copy (the same function as the original)
    assert torch.allclose(logits(load("bert", tmp_path / "fused"), "bert"), logits(original, "bert"), atol=ATOL)
    assert {m.model for m in report.maps} == {0, 1} and report.anchor == 2


@pytest.mark.parametrize(
    "qk,residual", [("shared", "average"), ("separate", "skip"), ("separate", "branch"), ("joint", "weighted_scalar")]
)
def test_qk_and_residual_policies_recover_a_permutation(tmp_path, qk, residual):
    original = tiny_model("gpt2", 0).eval()
    a = save(original, tmp_path / "a", False)
    b = save(permuted_copy(original, "gpt2", seed=3), tmp_path / "b", False)
    report = splice.fuse([a, b], tmp_path / "fused", data=fusion_data("gpt2"), qk=qk, residual=residual, device="cpu")
    assert torch.allclose(logits(load("gpt2", tmp_path / "fused"), "gpt2"), logits(original, "gpt2"), atol=ATOL)
    spaces = {m.space for m in report.maps}
    assert ("qk" in spaces) == (qk != "separate") and ("q" in spaces) == (qk == "separate")
    if qk == "joint":  # one map over the 2 x 16 query and key neurons, whole heads moved
        joint = [m for m in report.maps if m.space == "qk"]
        assert {m.width for m in joint} == {(32, 32)} and all(m.head_split_mass == pytest.approx(0) for m in joint)
    weighted = [m.skip_weight for m in report.maps if m.skip_weight is not None]
    assert (len(weighted) == 1 + 2 * 2) == residual.startswith("weighted")  # embeddings + 2 adds per block
    assert all(0 < weight < 1 for weight in weighted)


@pytest.mark.parametrize(
    "arch,align,residual", [("bert", "activations", "weighted_matrix"), ("vit", "weights", "weighted_matrix")]
)
def test_weighted_residual_policies_recover_a_permutation(tmp_path, arch, align, residual):
    """The maps of a permuted copy agree at every add, so any per-neuron convex combination of them is the same
    permutation. With weight alignment, the data only measures the anchor's streams."""
    original = tiny_model(arch, 0).eval()
    a = save(original, tmp_path / "a", False)
    b = save(permuted_copy(original, arch, seed=2), tmp_path / "b", False)
    report = splice.fuse(
        [a, b], tmp_path / "fused", data=fusion_data(arch), align=align, residual=residual, device="cpu"
    )
    assert torch.allclose(logits(load(arch, tmp_path / "fused"), arch), logits(original, arch), atol=ATOL)
    assert all(m.permutation_closeness == pytest.approx(1.0) for m in report.maps)
    assert report.residual == residual and report.samples == 60
    assert all(0 < m.skip_weight < 1 for m in report.maps if m.kind == "residual")


def aligned_alone(arch: str, fused_dir: Path, anchor_dir: Path):
    """The second model as aligned, before averaging: fusion of two is (anchor + aligned) / 2."""
    fused, anchor = load(arch, fused_dir), load(arch, anchor_dir).state_dict()
    fused.load_state_dict({name: 2 * tensor - anchor[name] for name, tensor in fused.state_dict().items()})
    return fused.eval()


@pytest.mark.parametrize("arch", ["vit", "bert", "gpt2"])
def test_stream_and_whole_head_maps_keep_an_independent_models_function(tmp_path, arch):
    """Two independently initialised models: with one stream map, whole heads and a shared Q/K map every EMD map
    is a permutation consistent with the data flow, so the aligned second model computes exactly what it did;
    the paper's default maps (averaged at residual adds, heads mixed) do not keep it."""
    model_a, model_b = tiny_model(arch, 0).eval(), tiny_model(arch, 1).eval()
    a, b = save(model_a, tmp_path / "a", False), save(model_b, tmp_path / "b", False)
    report = splice.fuse(
        [a, b],
        tmp_path / "coherent",
        data=fusion_data(arch),
        residual="stream",
        heads="whole",
        qk="shared",
        device="cpu",
    )
    assert torch.allclose(logits(aligned_alone(arch, tmp_path / "coherent", a), arch), logits(model_b, arch), atol=ATOL)
    assert all(m.permutation_closeness == pytest.approx(1.0) for m in report.maps)
    heads = [m for m in report.maps if m.cross_head_mass is not None]
    assert {m.space for m in heads} == {"qk", "v"} and all(m.head_split_mass == pytest.approx(0) for m in heads)
    assert [m.layer for m in report.maps if m.space == "stream" and m.kind == "ot"] == ["all layers"]
    assert report.heads == "whole" and json.loads((tmp_path / "coherent" / REPORT_FILE).read_text())["heads"] == "whole"
    splice.fuse([a, b], tmp_path / "paper", data=fusion_data(arch), device="cpu")
    paper = logits(aligned_alone(arch, tmp_path / "paper", a), arch)
    assert not torch.allclose(paper, logits(model_b, arch), atol=1e-3)


@pytest.mark.parametrize("arch,qk", [("vit", "separate"), ("gpt2", "shared"), ("bert", "separate")])
def test_stream_and_whole_head_maps_recover_a_permutation(tmp_path, arch, qk):
    original = tiny_model(arch, 0).eval()
    a = save(original, tmp_path / "a", False)
    b = save(permuted_copy(original, arch, seed=4), tmp_path / "b", False)
    report = splice.fuse(
        [a, b], tmp_path / "fused", data=fusion_data(arch), residual="stream", heads="whole", qk=qk, device="cpu"
    )
    assert torch.allclose(logits(load(arch, tmp_path / "fused"), arch), logits(original, arch), atol=ATOL)
    assert any(m.cross_head_mass > 0 for m in report.maps if m.cross_head_mass is not None)


def test_whole_head_maps_are_the_best_head_structured_permutation():
    """Against brute force: over every assignment of heads and of dimensions within each head, the least
    summed cost of the Q/K and V parts is what the maps of `head_couplings` pay."""
    import itertools

    from splice.merge.fusion.transport import head_couplings

    generator = torch.Generator().manual_seed(5)
    heads, size = 3, 2
    costs = [torch.rand(heads * size, heads * size, generator=generator, dtype=torch.float64) for _ in range(2)]
    costs = [cost / cost.max() for cost in costs]

    def within(cost: torch.Tensor, h: int, g: int) -> float:
        block = cost[h * size : (h + 1) * size, g * size : (g + 1) * size]
        return min(sum(float(block[i, p[i]]) for i in range(size)) for p in itertools.permutations(range(size)))

    best = min(
        sum(within(cost, h, order[h]) for cost in costs for h in range(heads))
        for order in itertools.permutations(range(heads))
    )
    couplings, head_map = head_couplings(costs, heads, heads, "emd")
    paid = sum(float((coupling * cost).sum()) for coupling, cost in zip(couplings, costs))
    assert paid * heads * size == pytest.approx(best, abs=1e-12)
    n = heads * size
    for coupling in couplings:
        assert torch.allclose(coupling.sum(0), torch.full((n,), 1 / n, dtype=torch.float64))
        assert torch.allclose(coupling.sum(1), torch.full((n,), 1 / n, dtype=torch.float64))
        assert int((coupling > 0).sum()) == n
    assert int((head_map > 0).sum()) == heads


def test_residual_weights_match_an_independent_computation():
    from splice.merge.fusion.transport import combine, stream_magnitudes

    generator = torch.Generator().manual_seed(0)
    n = 5
    perm_a, perm_b = torch.eye(n)[torch.randperm(n, generator=generator)], torch.eye(n)
    soft = torch.rand(n, n, generator=generator, dtype=torch.float64)
    for _ in range(50):  # Sinkhorn-balance to uniform marginals: a soft coupling
        soft = soft / soft.sum(1, keepdim=True) / n
        soft = soft / soft.sum(0, keepdim=True) / n
    skip_acts = torch.randn(40, n, generator=generator, dtype=torch.float64) * torch.arange(1.0, n + 1)
    branch_acts = torch.randn(40, n, generator=generator, dtype=torch.float64) * 0.5
    skip_acts[:, 2] = 0.0  # a silent neuron in one stream
    for skip, branch in [(perm_a.double() / n, soft), (perm_a.double() / n, perm_b.double() / n)]:
        magnitudes = [stream_magnitudes(skip_acts), stream_magnitudes(branch_acts)]
        # weighted_scalar: each map times the mean |activation| of its stream, the two normalised to sum to 1
        s_skip = sum(abs(float(x)) for x in skip_acts.flatten()) / skip_acts.numel()
        s_branch = sum(abs(float(x)) for x in branch_acts.flatten()) / branch_acts.numel()
        expected = (s_skip * skip + s_branch * branch) / (s_skip + s_branch)
        assert torch.allclose(combine("weighted_scalar", [skip, branch], magnitudes), expected, atol=1e-12)
        # weighted_matrix: T = T_skip D_s + T_branch D_b, D diagonal per anchor neuron, D_s + D_b = I
        d_skip = torch.zeros(n, n, dtype=torch.float64)
        d_branch = torch.zeros(n, n, dtype=torch.float64)
        for j in range(n):
            m_s = sum(abs(float(skip_acts[t, j])) for t in range(40)) / 40
            m_b = sum(abs(float(branch_acts[t, j])) for t in range(40)) / 40
            d_skip[j, j], d_branch[j, j] = m_s / (m_s + m_b), m_b / (m_s + m_b)
        combined = combine("weighted_matrix", [skip, branch], magnitudes)
        assert torch.allclose(combined, skip @ d_skip + branch @ d_branch, atol=1e-12)
        assert torch.allclose(combined.sum(0), torch.full((n,), 1.0 / n, dtype=torch.float64))  # anchor marginal
        assert torch.allclose(combined[:, 2] * n, branch[:, 2] * n)  # silent skip neuron: the branch's map
    # equal maps: every weighting gives back the same map
    same = perm_a.double() / n
    for policy in ("weighted_scalar", "weighted_matrix"):
        assert torch.equal(combine(policy, [same, same], magnitudes), same)
    # both streams silent at a neuron: equal weights there
    zeros = torch.zeros(3, n, dtype=torch.float64)
    halves = combine("weighted_matrix", [perm_a.double() / n, soft], [stream_magnitudes(zeros)] * 2)
    assert torch.allclose(halves, (perm_a.double() / n + soft) / 2)


@pytest.mark.parametrize("arch", ["vit", "bert", "gpt2"])
def test_fusing_a_model_with_itself_is_the_identity(tmp_path, arch):
    model = tiny_model(arch, 4)
    a = save(model, tmp_path / "a", False)
    splice.fuse([a, a], tmp_path / "fused", data=fusion_data(arch), device="cpu")
    original, fused = load_dir(a), load_dir(tmp_path / "fused")
    assert original.keys() == fused.keys()
    assert all(torch.equal(original[name], fused[name]) for name in original)
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config == json.loads((a / "config.json").read_text())


def test_identity_residual_policy_keeps_the_residual_order(tmp_path):
    original = tiny_model("vit", 0).eval()
    a = save(original, tmp_path / "a", False)
    b = save(permuted_copy(original, "vit", seed=5, residual=False), tmp_path / "b", False)
    splice.fuse([a, b], tmp_path / "fused", align="weights", residual="identity", device="cpu")
    assert torch.allclose(logits(load("vit", tmp_path / "fused"), "vit"), logits(original, "vit"), atol=ATOL)


@pytest.mark.parametrize("align", ["activations", "weights"])
@pytest.mark.parametrize("anchor", [0, 1])
def test_heterogeneous_widths_fuse_into_the_anchor(tmp_path, align, anchor):
    """A model with every width doubled by duplicated neurons, fused with the narrow original, gives the
    anchor's shapes and config and the original function, whichever of the two is the anchor."""
    narrow = tiny_model("vit", 0).eval()
    wide = widened_copy(narrow, "vit")
    assert torch.allclose(logits(wide, "vit"), logits(narrow, "vit"), atol=ATOL)
    dirs = [save(wide, tmp_path / "wide", False), save(narrow, tmp_path / "narrow", False)]
    report = splice.fuse(dirs, tmp_path / "fused", data=fusion_data("vit"), align=align, anchor=anchor, device="cpu")
    anchor_dir = dirs[anchor]
    assert json.loads((tmp_path / "fused" / "config.json").read_text()) == json.loads(
        (anchor_dir / "config.json").read_text()
    )
    fused = load("vit", tmp_path / "fused")
    assert {k: v.shape for k, v in load_dir(tmp_path / "fused").items()} == {
        k: v.shape for k, v in load_dir(anchor_dir).items()
    }
    assert torch.allclose(logits(fused, "vit"), logits(narrow, "vit"), atol=ATOL)
    assert all(m.permutation_closeness == pytest.approx(1.0) for m in report.maps)  # hard many-to-one maps
    assert report.widths[0]["hidden"] == 32 and report.widths[1]["hidden"] == 16


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_wider_independent_model_compresses_into_a_narrow_anchor(tmp_path, arch):
    narrow = tiny_model(arch, 0)
    config = narrow.config.to_dict()
    config.update(
        {"n_embd": 24, "n_head": 3, "n_inner": 96}
        if arch == "gpt2"
        else {"hidden_size": 24, "num_attention_heads": 3, "intermediate_size": 40}
    )
    torch.manual_seed(9)
    wide = type(narrow)(type(narrow.config).from_dict(config))
    dirs = [save(narrow, tmp_path / "narrow", False), save(wide, tmp_path / "wide", False)]
    report = splice.fuse(dirs, tmp_path / "fused", data=fusion_data(arch), solver="sinkhorn", device="cpu")
    fused = load(arch, tmp_path / "fused")
    assert (tmp_path / "fused" / "config.json").read_text() == (dirs[0] / "config.json").read_text()
    assert torch.isfinite(logits(fused, arch)).all()
    mlp = (96, 64) if arch == "gpt2" else (40, 24)
    assert {m.width for m in report.maps} == {(24, 16), mlp}


def test_sinkhorn_soft_maps_and_small_reg(tmp_path):
    model_a, model_b = tiny_model("vit", 0), tiny_model("vit", 1)
    dirs = [save(model_a, tmp_path / "a", False), save(model_b, tmp_path / "b", False)]
    soft = splice.fuse(dirs, tmp_path / "soft", data=fusion_data("vit"), solver="sinkhorn", reg=0.5, device="cpu")
    sharp = splice.fuse(
        dirs, tmp_path / "sharp", data=fusion_data("vit"), solver="sinkhorn", reg=0.002, device="cpu"
    )  # log-domain Sinkhorn: plain iterations under-flow at this reg
    hard = splice.fuse(dirs, tmp_path / "hard", data=fusion_data("vit"), device="cpu")

    def closeness(report: FusionReport) -> float:
        solved = [m.permutation_closeness for m in report.maps if m.kind == "ot"]
        return sum(solved) / len(solved)

    assert closeness(soft) < closeness(sharp) <= closeness(hard) + 1e-9
    assert closeness(hard) == pytest.approx(1.0)
    assert soft.reg == 0.5 and hard.reg is None
    for out in ("soft", "sharp", "hard"):
        assert torch.isfinite(logits(load("vit", tmp_path / out), "vit")).all()


# -- options and progress ---------------------------------------------------------------------------------------


class RecordingProgress:
    """Every phase a Progress object is told about: description, totals, what was advanced, whether finished."""

    def __init__(self):
        self.phases: list[dict] = []

    def start(self, description, total_items, total_bytes, unit="tensors"):
        assert not self.phases or self.phases[-1]["finished"], "a phase started inside another"
        self.phases.append(
            {
                "description": description,
                "unit": unit,
                "total_items": total_items,
                "total_bytes": total_bytes,
                "items": 0,
                "bytes": 0,
                "finished": False,
            }
        )

    def advance(self, items, nbytes):
        assert not self.phases[-1]["finished"]
        self.phases[-1]["items"] += items
        self.phases[-1]["bytes"] += nbytes

    def finish(self):
        self.phases[-1]["finished"] = True


@pytest.mark.parametrize("residual", ["average", "stream"])
def test_progress_sees_the_activation_and_transport_phases_through(tmp_path, residual):
    original = tiny_model("bert", 0).eval()
    a, b = save(original, tmp_path / "a", False), save(permuted_copy(original, "bert", seed=1), tmp_path / "b", False)
    progress = RecordingProgress()
    report = splice.fuse(
        [a, b],
        tmp_path / "fused",
        data=fusion_data("bert", count=70),
        residual=residual,
        device="cpu",
        progress=progress,
    )
    assert [(phase["description"], phase["unit"]) for phase in progress.phases] == [
        (f"activations {a}", "batches"),
        (f"activations {b}", "batches"),
        (f"transport maps {b}", "maps"),
    ]
    for phase in progress.phases:
        assert phase["finished"] and phase["items"] == phase["total_items"] > 0
        assert phase["bytes"] == phase["total_bytes"] > 0
    assert progress.phases[0]["total_items"] == 3  # 70 samples in batches of 32
    maps = progress.phases[-1]["total_items"]
    if residual == "average":  # every space's map is solved or combined, each once
        assert maps == len(report.maps)
    else:  # the stream map, then the spaces written into the stream take it without a solve of their own
        assert maps > len(report.maps)


def test_options_whole_or_as_keywords_fuse_the_same(tmp_path):
    original = tiny_model("vit", 0).eval()
    a, b = save(original, tmp_path / "a", False), save(tiny_model("vit", 1), tmp_path / "b", False)
    options = FusionOptions(align="weights", solver="sinkhorn", reg=0.1, device="cpu")
    whole = splice.fuse([a, b], tmp_path / "whole", options)
    loose = splice.fuse([a, b], tmp_path / "loose", align="weights", solver="sinkhorn", reg=0.1, device="cpu")
    overridden = splice.fuse([a, b], tmp_path / "overridden", options, reg=0.5)
    assert load_dir(tmp_path / "whole").keys() == load_dir(tmp_path / "loose").keys()
    assert all(
        torch.equal(load_dir(tmp_path / "whole")[name], tensor) for name, tensor in load_dir(tmp_path / "loose").items()
    )
    assert whole.maps == loose.maps and overridden.reg == 0.5 and options.reg == 0.1
    with pytest.raises(SpliceError, match="unknown option 'solvr'"):
        splice.fuse([a, b], tmp_path / "out", options, solvr="emd")
    with pytest.raises(SpliceError, match="unknown solver"):
        FusionOptions(align="weights", solver="greedy")
    with pytest.raises(SpliceError, match="needs `data"):
        FusionOptions()
    with pytest.raises(SpliceError, match="`samples` must be at least 1"):
        FusionOptions(data=fusion_data("vit"), samples=0)
    assert FusionOptions(align="weights", samples=0).samples == 0  # unused without data, as before
    assert not (tmp_path / "out").exists()


# -- refused before any work ------------------------------------------------------------------------------------


def _vit(tmp_path: Path, name: str, **changes) -> Path:
    config = dict(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
    )
    config.update(changes)
    torch.manual_seed(0)
    return save(transformers.ViTForImageClassification(transformers.ViTConfig(**config)), tmp_path / name, False)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_hidden_layers": 3}, "different depths"),
        ({"patch_size": 2}, "patch_size"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"num_labels": 5}, "number of labels"),
    ],
)
def test_mismatched_models_are_refused(tmp_path, change, message):
    a, b = _vit(tmp_path, "a"), _vit(tmp_path, "b", **change)
    with pytest.raises(IncompatibleModelsError, match=message):
        splice.fuse([a, b], tmp_path / "out", data=fusion_data("vit"))
    assert not (tmp_path / "out").exists()


def test_different_vocabularies_and_architectures_are_refused(tmp_path):
    bert = tiny_model("bert", 0)
    config = bert.config.to_dict()
    config["vocab_size"] = 80
    other = type(bert)(type(bert.config).from_dict(config))
    a, b = save(bert, tmp_path / "a", False), save(other, tmp_path / "b", False)
    with pytest.raises(IncompatibleModelsError, match="different vocabularies"):
        splice.fuse([a, b], tmp_path / "out", align="weights")
    gpt2 = save(tiny_model("gpt2", 0), tmp_path / "gpt2", False)
    with pytest.raises(SpliceError, match="different architectures"):
        splice.fuse([a, gpt2], tmp_path / "out", align="weights")
    llama = save(tiny_model("llama", 0), tmp_path / "llama", False)
    with pytest.raises(SpliceError, match="does not support model_type 'llama'"):
        splice.fuse([llama, llama], tmp_path / "out", align="weights")
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused(tmp_path):
    a = _vit(tmp_path, "a")
    with pytest.raises(SpliceError, match="needs `data"):
        splice.fuse([a, a], tmp_path / "out")
    with pytest.raises(SpliceError, match="at least two models"):
        splice.fuse([a], tmp_path / "out", align="weights")
    with pytest.raises(SpliceError, match="`anchor=2`"):
        splice.fuse([a, a], tmp_path / "out", align="weights", anchor=2)
    with pytest.raises(SpliceError, match="unknown solver"):
        splice.fuse([a, a], tmp_path / "out", align="weights", solver="greedy")
    with pytest.raises(SpliceError, match="`data` function"):
        splice.fuse([a, a], tmp_path / "out", data=lambda: 1 / 0)
    wide = save(widened_copy(tiny_model("vit", 0), "vit"), tmp_path / "wide", False)
    with pytest.raises(SpliceError, match="same hidden size"):
        splice.fuse([a, wide], tmp_path / "out", align="weights", residual="identity")
    with pytest.raises(SpliceError, match="weighted_matrix'` weighs the maps by the streams' activations: give `data`"):
        splice.fuse([a, a], tmp_path / "out", align="weights", residual="weighted_matrix")
    with pytest.raises(SpliceError, match="unknown residual policy 'weighted'"):
        splice.fuse([a, a], tmp_path / "out", align="weights", residual="weighted")
    with pytest.raises(SpliceError, match="unknown Q/K policy"):
        splice.fuse([a, a], tmp_path / "out", align="weights", qk="together")
    with pytest.raises(SpliceError, match="unknown head policy 'split'"):
        splice.fuse([a, a], tmp_path / "out", align="weights", heads="split")
    with pytest.raises(SpliceError, match="`qk='joint'` .* splits heads"):
        splice.fuse([a, a], tmp_path / "out", align="weights", heads="whole", qk="joint")
    with pytest.raises(SpliceError, match="`residual='stream'` .* use `align='activations'`"):
        splice.fuse([a, a], tmp_path / "out", align="weights", residual="stream")
    assert not (tmp_path / "out").exists()


# -- the command line -----------------------------------------------------------------------------------------


def test_cli_fuse_prints_the_report_and_saves_it(tmp_path, monkeypatch, capsys):
    original = tiny_model("bert", 0)
    a = save(original, tmp_path / "a", False)
    b = save(permuted_copy(original.eval(), "bert", seed=1), tmp_path / "b", False)
    data_file = tmp_path / "inputs.py"
    data_file.write_text(
        "import torch\n\ndef batch(model_dir):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return {'input_ids': torch.randint(0, 64, (40, 9), generator=g)}\n"
    )
    code, out, err = run_cli(
        [
            "fuse",
            a,
            b,
            "--out",
            tmp_path / "fused",
            "--data",
            f"{data_file}:batch",
            "--samples",
            "30",
            "--device",
            "cpu",
            "--quiet",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    saved = json.loads((tmp_path / "fused" / REPORT_FILE).read_text())
    assert saved["samples"] == 30 and saved["align"] == "activations"
    timings = saved["timings"]
    assert set(timings) == {"read", "activations", "ot", "transport", "write", "total"}
    assert all(value >= 0 for value in timings.values()) and timings["activations"] > 0 and timings["ot"] > 0
    assert sum(value for key, value in timings.items() if key != "total") <= timings["total"] + 1e-3
    assert saved["notes"] == []  # on the CPU nothing to say about where EMD ran
    assert torch.allclose(logits(load("bert", tmp_path / "fused"), "bert"), logits(original, "bert"), atol=ATOL)

    code, out, err = run_cli(
        [
            "fuse",
            a,
            b,
            "--out",
            tmp_path / "fused2",
            "--align",
            "weights",
            "--solver",
            "sinkhorn",
            "--reg",
            "0.05",
            "--anchor",
            "1",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "fusion maps per layer" in out and "layer 1" in out and "fusion_report.json" in out
    assert re.search(
        r"\(read [\d.]+s, activations 0\.0s, OT [\d.]+s, transport [\d.]+s, write [\d.]+s\)", " ".join(out.split())
    )


def test_cli_fuse_errors_are_one_line(tmp_path, monkeypatch, capsys):
    a = _vit(tmp_path, "a")
    b = _vit(tmp_path, "b", num_hidden_layers=3)
    code, out, err = run_cli(["fuse", a, b, "--out", tmp_path / "out", "--align", "weights"], monkeypatch, capsys)
    assert code == 2 and "different depths" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(
        ["fuse", a, a, "--out", tmp_path / "out", "--data", "no_such_module:f"], monkeypatch, capsys
    )
    assert code == 2 and "--data" in err and "no_such_module" in err
    assert not (tmp_path / "out").exists()
