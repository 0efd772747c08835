"""RegMean++'s block walk against independent computations: a two-layer MLP merged in numpy, and, on tiny ViT, BERT,
GPT-2, Llama, Mistral and Qwen2 models, whole live models merged block by block with forward hooks (a different code
path: full forwards of a hybrid model whose block l is the task's and whose earlier blocks are merged); block 0 is
splice's plain RegMean when the embeddings agree."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from splice.arch.layers import before_layers, layer_index
from splice.arch.names import stored_to_module_names
from splice.errors import SpliceError
from splice.merge.fusion.activations import Inputs
from splice.merge.stats.blocks import Chunk, TransformersBlocks
from splice.merge.stats.collect import collect_grams
from splice.merge.stats.solve import WeightLayout, regmean
from splice.merge.stats.walk import regmean_plusplus, walk
from splice.tensors.checkpoint import Checkpoint

from conftest import perturbed, save, tiny_model

ALPHA = 0.9
WEIGHTS = (1.0, 2.0, 1.5)
SAMPLES = (40, 24, 30)  # the first task runs in two chunks of the walk (32 per chunk)


# -- a two-layer MLP, merged in numpy --------------------------------------------------------------------------------


class MLPStack:
    """x -> relu(W0 x + b0) -> W1 h + b1, stored as layers.0.* and layers.1.*: block 0 is the first Linear and the
    ReLU, block 1 the second Linear."""

    def __init__(self, widths: tuple[int, int, int]):
        self.layers = [torch.nn.Linear(widths[0], widths[1]), torch.nn.Linear(widths[1], widths[2])]

    def enter(self, before, inputs):
        assert not before
        return [[Chunk(task.batch, None)] for task in inputs]

    def load(self, index, tensors):
        self.layers[index].load_state_dict({key.split(".")[-1]: value for key, value in tensors.items()})
        return {f"layers.{index}.weight": self.layers[index]}

    def run(self, index, chunk):
        out = self.layers[index](chunk.hidden)
        return torch.relu(out) if index == 0 else out

    def unload(self, index):
        pass


def _numpy_regmean(ws, grams, alpha):
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    return np.linalg.solve(sum(shrunk), sum(w @ g for w, g in zip(ws, shrunk)).T).T


def _numpy_average(tensors, weights):
    return sum(w * t for w, t in zip(weights, tensors)) / sum(weights)


def test_two_layer_mlp_equals_numpy(tmp_path):
    rng = np.random.default_rng(0)
    widths = (5, 7, 3)
    base = {
        "layers.0.weight": rng.normal(size=(7, 5)),
        "layers.0.bias": rng.normal(size=7),
        "layers.1.weight": rng.normal(size=(3, 7)),
        "layers.1.bias": rng.normal(size=3),
    }
    tasks = [{name: value + 0.3 * rng.normal(size=value.shape) for name, value in base.items()} for _ in range(3)]
    tasks = [{name: value.astype(np.float32) for name, value in task.items()} for task in tasks]
    xs = [rng.normal(loc=0.5 * i, size=(n, widths[0])).astype(np.float32) for i, n in enumerate(SAMPLES)]
    checkpoints = []
    for i, task in enumerate(tasks):
        (tmp_path / f"mlp{i}").mkdir()
        save_file({k: torch.tensor(v) for k, v in task.items()}, tmp_path / f"mlp{i}" / "model.safetensors")
        checkpoints.append(Checkpoint.open(tmp_path / f"mlp{i}"))
    inputs = [Inputs(torch.tensor(x), len(x)) for x in xs]
    parts = list(walk(checkpoints, inputs, MLPStack(widths), ALPHA, WEIGHTS))
    merged = {name: tensor for part in parts for name, tensor in part.tensors.items()}

    # independent: layer 0 from the raw inputs; layer 1 from the outputs of the *merged* layer 0
    x64 = [x.astype(np.float64) for x in xs]
    t64 = [{k: v.astype(np.float64) for k, v in task.items()} for task in tasks]
    w0 = _numpy_regmean([t["layers.0.weight"] for t in t64], [x.T @ x for x in x64], ALPHA)
    b0 = _numpy_average([t["layers.0.bias"] for t in t64], WEIGHTS)
    hs = [np.maximum(x @ w0.T + b0, 0) for x in x64]
    w1 = _numpy_regmean([t["layers.1.weight"] for t in t64], [h.T @ h for h in hs], ALPHA)
    b1 = _numpy_average([t["layers.1.bias"] for t in t64], WEIGHTS)
    expected = {"layers.0.weight": w0, "layers.0.bias": b0, "layers.1.weight": w1, "layers.1.bias": b1}
    assert set(merged) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(merged[name].numpy(), value, rtol=0, atol=1e-5, err_msg=name)

    # RegMean (layer 1 fed by each task's own layer 0) is a different answer: the test tells the two apart
    own = [np.maximum(x @ t["layers.0.weight"].T + t["layers.0.bias"], 0) for x, t in zip(x64, t64)]
    plain = _numpy_regmean([t["layers.1.weight"] for t in t64], [h.T @ h for h in own], ALPHA)
    assert np.abs(plain - w1).max() > 1e-2
    assert [part.scope for part in parts] == ["embeddings", "block 0", "block 1", "head"]
    assert [s.tensor for s in parts[2].solved] == ["layers.1.weight"] and not parts[2].solved[0].pseudo_inverse
    assert parts[2].averaged == ("layers.1.bias",)


# -- transformers models ---------------------------------------------------------------------------------------------

ARCHS = ("vit", "bert", "gpt2", "llama", "mistral", "qwen2")


def _batches(arch: str) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    batches = []
    for task, count in enumerate(SAMPLES):
        if arch == "vit":
            batches.append({"pixel_values": torch.rand(count, 1, 8, 8, generator=generator) + 0.3 * task})
            continue
        ids = torch.randint(0, 64, (count, 9), generator=generator)
        lengths = torch.randint(3, 10, (count,), generator=generator)
        lengths[0] = 9
        mask = (torch.arange(9)[None] < lengths[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _task_models(arch: str, same_embeddings: bool) -> list[torch.nn.Module]:
    base = tiny_model(arch, 0)
    models = [perturbed(base, seed, scale=0.05).eval() for seed in (1, 2, 3)]
    if same_embeddings:  # block 0's inputs are then the same in RegMean and RegMean++
        names = stored_to_module_names(base)
        live = {names[s] for s in names if layer_index(s) is None and before_layers(s)}
        for model in models:
            model.load_state_dict({k: v for k, v in base.state_dict().items() if k in live}, strict=False)
    return models


def _block_list(model: torch.nn.Module) -> torch.nn.ModuleList:
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))


def _independent(models, batches, weights, alpha) -> dict[str, torch.Tensor]:
    """RegMean++ on whole live models: the merged model starts as the weighted average of everything; for block l,
    a copy of it with block l replaced by task i's runs task i's whole batch in one forward, pre-hooks on that
    block's linear layers take X^T X over the real tokens; the solve is float64 least squares."""
    total = sum(weights)
    states = [m.state_dict() for m in models]
    merged = copy.deepcopy(models[0])
    merged.load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states)) / total for k in states[0]})
    for index in range(len(_block_list(merged))):
        grams: list[dict[str, torch.Tensor]] = []
        for model, batch in zip(models, batches):
            hybrid = copy.deepcopy(merged)
            _block_list(hybrid)[index].load_state_dict(_block_list(model)[index].state_dict())
            seen: dict[str, torch.Tensor] = {}
            handles = [
                module.register_forward_pre_hook(lambda _m, args, path=path, seen=seen: seen.__setitem__(path, args[0]))
                for path, module in _block_list(hybrid)[index].named_modules()
                if isinstance(module, (torch.nn.Linear, Conv1D))
            ]
            with torch.no_grad():
                hybrid(**batch)
            for handle in handles:
                handle.remove()
            mask = batch.get("attention_mask")
            rows = {p: (x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1])) for p, x in seen.items()}
            grams.append({p: r.double().T @ r.double() for p, r in rows.items()})
        block = _block_list(merged)[index]
        for path, module in block.named_modules():
            if path not in grams[0]:
                continue
            shrunk = [alpha * g[path] + (1 - alpha) * torch.diag(torch.diag(g[path])) for g in grams]
            ws = [_block_list(m)[index].get_submodule(path).weight.double() for m in models]
            if isinstance(module, Conv1D):  # y = x W: W = S^-1 sum G W_i
                solved = torch.linalg.solve(sum(shrunk), sum(g @ w for g, w in zip(shrunk, ws)))
            else:  # y = x W^T: W = (sum W_i G) S^-1
                solved = torch.linalg.solve(sum(shrunk), sum(w @ g for w, g in zip(ws, shrunk)).T).T
            module.weight.data = solved.float()
    return merged.state_dict()


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(arch, same_embeddings) -> (task models, their checkpoints, Inputs per task), built once per module."""
    cache: dict[tuple[str, bool], tuple] = {}

    def build(arch: str, same_embeddings: bool = False):
        if (arch, same_embeddings) not in cache:
            models = _task_models(arch, same_embeddings)
            root = tmp_path_factory.mktemp(f"{arch}{'-same' if same_embeddings else ''}")
            checkpoints = [
                Checkpoint.open(save(m, Path(root / f"task{i}"), sharded=i == 1)) for i, m in enumerate(models)
            ]
            batches = _batches(arch)
            inputs = [Inputs(batch, len(next(iter(batch.values())))) for batch in batches]
            cache[arch, same_embeddings] = (models, checkpoints, batches, inputs)
        return cache[arch, same_embeddings]

    return build


@pytest.mark.parametrize("arch", ARCHS)
def test_walk_equals_whole_live_models_merged_with_hooks(stored, arch):
    models, checkpoints, batches, inputs = stored(arch)
    parts = list(regmean_plusplus(checkpoints, inputs, alpha=ALPHA, weights=WEIGHTS))
    merged = {name: tensor for part in parts for name, tensor in part.tensors.items()}
    assert set(merged) == set(checkpoints[0].tensors)
    expected = _independent(models, batches, WEIGHTS, ALPHA)
    live = stored_to_module_names(models[0])
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[live[name]], rtol=0, atol=1e-5, msg=name)
    solved = [s for part in parts for s in part.solved]
    assert solved and not any(s.pseudo_inverse for s in solved)
    # RegMean++ is not the plain average: at least one solved weight moved away from it
    average = {k: sum(w * m.state_dict()[k] for w, m in zip(WEIGHTS, models)) / sum(WEIGHTS) for k in expected}
    assert max(float((merged[s.tensor] - average[live[s.tensor]]).abs().max()) for s in solved) > 1e-3


@pytest.mark.parametrize("arch", ("vit", "bert", "gpt2", "llama"))
def test_block_0_equals_plain_regmean_when_the_embeddings_agree(stored, arch):
    models, checkpoints, batches, inputs = stored(arch, same_embeddings=True)
    parts = regmean_plusplus(checkpoints, inputs, alpha=ALPHA, weights=WEIGHTS)
    next(parts)  # the embeddings
    block = next(parts)
    parts.close()
    assert block.scope == "block 0"
    grams = [collect_grams(model, task) for model, task in zip(models, inputs)]
    assert block.solved
    for solve in block.solved:
        layout = WeightLayout.in_out if solve.tensor in grams[0].transposed else WeightLayout.out_in
        expected = regmean(
            [c.read(solve.tensor).float() for c in checkpoints],
            [g.of(solve.tensor) for g in grams],
            ALPHA,
            layout,
            solve.tensor,
        )
        torch.testing.assert_close(block.tensors[solve.tensor], expected.weight, rtol=0, atol=1e-5, msg=solve.tensor)
        assert solve.condition == pytest.approx(expected.condition, rel=1e-6)
    assert {s.tensor for s in block.solved} == {name for name in grams[0].keys if layer_index(name) == 0}


def test_one_block_of_weights_is_real_at_a_time(stored, monkeypatch):
    """The module tree is on the meta device but for the block being run: after each load, the real parameters are
    exactly that block's (the embeddings are real only while the inputs enter)."""
    _, checkpoints, _, inputs = stored("llama")
    original_load = TransformersBlocks.load
    seen = []

    def load(self, index, tensors):
        layers = original_load(self, index, tensors)
        real = {name for name, p in self.model.named_parameters() if not p.is_meta}
        assert real == {f"model.layers.{index}.{name}" for name, _ in self.blocks[index].named_parameters()}
        seen.append(index)
        return layers

    monkeypatch.setattr(TransformersBlocks, "load", load)
    list(regmean_plusplus(checkpoints, inputs, alpha=ALPHA))
    # per block: each of the 3 tasks for its Grams, then the merged block once (none after the last block)
    assert seen == [0, 0, 0, 0, 1, 1, 1]


def test_an_architecture_splice_cannot_run_block_by_block_is_refused(tmp_path, stored):
    t5 = [Checkpoint.open(save(perturbed(tiny_model("t5", 0), i), tmp_path / f"t5-{i}", False)) for i in (1, 2)]
    batch = Inputs({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, 2)
    with pytest.raises(SpliceError) as caught:
        regmean_plusplus(t5, [batch, batch])
    message = str(caught.value)
    assert "T5ForConditionalGeneration" in message and "cannot run block by block" in message
    assert "use merge_method: regmean" in message and "\n" not in message

    _, bert, _, bert_inputs = stored("bert")
    _, gpt2, _, _ = stored("gpt2")
    with pytest.raises(SpliceError, match="is not a BertForSequenceClassification"):
        regmean_plusplus([bert[0], gpt2[0]], bert_inputs[:2])
    with pytest.raises(SpliceError, match="2 `data` inputs for 3 models"):
        regmean_plusplus(bert, bert_inputs[:2])
    with pytest.raises(SpliceError, match=r"alpha must be in \[0, 1\]"):
        regmean_plusplus(bert, bert_inputs, alpha=2.0)
    wider = tiny_model("bert", 0)
    wider = type(wider)(type(wider.config)(**{**wider.config.to_dict(), "intermediate_size": 32}))
    with pytest.raises(SpliceError, match=r"is \[24\] in .* but \[32\] in .*merges models of one shape"):
        regmean_plusplus([bert[0], Checkpoint.open(save(wider, tmp_path / "wider", False))], bert_inputs[:2])
    # inputs the model cannot take: refused when the walk starts, before its first part comes out
    parts = regmean_plusplus(bert, [Inputs({"input_ids": torch.full((2, 4), 999)}, 2)] * 3)
    with pytest.raises(SpliceError, match="the `data` inputs do not run through BertForSequenceClassification"):
        next(parts)


# -- as a recipe: `merge_method: regmean_plusplus`, each model's `data:` hook ------------------------------------------


def _recipe(checkpoints, hooks: list[str], **parameters) -> dict:
    models = [
        {"model": c.location, "data": hook, "parameters": {"weight": weight}}
        for c, hook, weight in zip(checkpoints, hooks, WEIGHTS)
    ]
    return {"merge_method": "regmean_plusplus", "models": models, "parameters": {"alpha": ALPHA, **parameters}}


@pytest.fixture
def hooks(stored, tmp_path):
    """(task models, checkpoints, `data:` hooks giving each task's batch) for GPT-2."""
    models, checkpoints, batches, _ = stored("gpt2")
    lines = ["import torch", ""]
    for i, batch in enumerate(batches):
        torch.save(batch, tmp_path / f"task{i}.pt")
        lines += [f"def task{i}():", f"    return torch.load({str(tmp_path / f'task{i}.pt')!r})", ""]
    (tmp_path / "tasks.py").write_text("\n".join(lines))
    return models, checkpoints, batches, [f"{tmp_path / 'tasks.py'}:task{i}" for i in range(len(batches))]


def test_a_regmean_plusplus_recipe_equals_the_independent_walk_and_reloads(hooks, tmp_path):
    import splice
    from splice.merge.recipe import parse_recipe
    from splice.workflows.merge import merged_model

    models, checkpoints, batches, data = hooks
    recipe = parse_recipe(_recipe(checkpoints, data))
    report = splice.merge(recipe, tmp_path / "out", device="cpu")
    expected = _independent(models, batches, WEIGHTS, ALPHA)
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval().state_dict()
    for live_name in stored_to_module_names(models[0]).values():
        torch.testing.assert_close(merged[live_name], expected[live_name], rtol=0, atol=1e-5)
    assert report.method_report.rules == {"regmean": 8, "fallback": len(checkpoints[0].tensors) - 8}
    assert len(report.method_report.solves) == 8 and not report.method_report.pseudo_inverse_layers
    in_memory = merged_model(recipe, run=splice.RunOptions(device="cpu")).state
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert set(in_memory) == set(written) and all(torch.equal(in_memory[n], written[n]) for n in written)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "merge_method: regmean_plusplus" in card and "data: " in card


def test_samples_bounds_each_tasks_inputs(hooks, tmp_path):
    import splice
    from splice.merge.recipe import parse_recipe

    models, checkpoints, batches, data = hooks
    splice.merge(parse_recipe(_recipe(checkpoints, data, samples=10)), tmp_path / "out", device="cpu")
    expected = _independent(models, [{k: v[:10] for k, v in b.items()} for b in batches], WEIGHTS, ALPHA)
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda r: r["models"][1].pop("data"), "gives no data:; regmean_plusplus runs each model's own task inputs"),
        (lambda r: r["parameters"].update(alpha=[0.5, 0.9]), "takes one value of 'alpha' for the whole walk"),
        (lambda r: r.update(tokenizer_source="union"), "merges models of one vocabulary"),
        (
            lambda r: r.update(merge_method="regmean"),
            "gives data:, which only regmean_plusplus and localize_stitch read",
        ),
        (lambda r: r["models"][0].update(stats="somewhere"), "gives stats:, which only regmean and fisher read"),
        (lambda r: r.update(base_model=r["models"][0]["model"]), "regmean_plusplus takes no base_model"),
    ],
    ids=["no_data", "alpha_gradient", "tokenizer", "data_on_regmean", "stats_on_plusplus", "base_model"],
)
def test_a_bad_regmean_plusplus_recipe_is_one_line(hooks, change, needle):
    from splice.merge.recipe import parse_recipe

    _, checkpoints, _, data = hooks
    recipe = _recipe(checkpoints, data)
    change(recipe)
    with pytest.raises(SpliceError, match=needle) as caught:
        parse_recipe(recipe)
    assert "\n" not in str(caught.value)


def test_data_the_model_cannot_take_is_refused_with_nothing_written(hooks, tmp_path):
    import splice
    from splice.merge.recipe import parse_recipe

    _, checkpoints, _, data = hooks
    (tmp_path / "images.py").write_text(
        "import torch\n\ndef batch():\n    return {'pixel_values': torch.rand(4, 1, 8, 8)}\n"
    )
    recipe = _recipe(checkpoints, [*data[:2], f"{tmp_path / 'images.py'}:batch"])
    with pytest.raises(SpliceError, match="do not run through"):
        splice.merge(parse_recipe(recipe), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
