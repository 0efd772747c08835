"""PortLLM in small: a LoRA patch made on v1 of a tiny byte-level Llama, ported onto v2, v3, v4 of that base.

v1 is pretrained here on half of the Python standard library's modules (their source and docstrings, read as
bytes); v2, v3, v4 are rounds of continued full pretraining, v1 -> v2 -> v3 -> v4, each on a different third of
the other half. Two tasks the script builds from words that occur in that text, each with disjoint train and
test words and scored by exact match of the answer bytes given the prompt:

    upper("socket") = "SOCKET"        reverse("socket") = "tekcos"

Per task a LoRA (peft, r=8, every attention and MLP matrix) is fine-tuned on v1 and saved with save_pretrained.
For each evolved base vN the script reports v1 + its patch, vN without a patch, vN + the v1 patch ported with
`splice.port` (no training, no data), and vN + a LoRA re-fine-tuned on vN with the same recipe and seed; the
drift between the re-fine-tuned update and the v1 update; and wall time and peak RSS of porting against
re-fine-tuning, each measured in a child process of its own.

    python examples/port_evolving.py --out DIR [--quick]

Writes DIR/port_evolving.json (every number), DIR/port_evolving.png and the models under DIR/models.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import re
import shutil
import sys
import sysconfig
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import load_file

import splice

transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft's call

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAD = 0  # the NUL byte, which the corpus never contains
TASKS = {
    "upper": lambda word: (f'upper("{word}") = "', f'{word.upper()}"\n'),
    "reverse": lambda word: (f'reverse("{word}") = "', f'{word[::-1]}"\n'),
}
ROWS = ("v1_patched", "unpatched", "ported", "refit")
ROW_TITLES = {
    "v1_patched": "v1 + its patch",
    "unpatched": "vN, no patch",
    "ported": "vN + ported v1 patch",
    "refit": "vN + LoRA re-fine-tuned on vN",
}


@dataclass(frozen=True)
class Config:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    seq: int = 128
    batch: int = 16
    pretrain_steps: int = 1500
    pretrain_lr: float = 2e-3
    evolve_steps: int = 400
    evolve_lr: float = 3e-4  # continued pretraining at a lower peak rate than pretraining's
    rounds: int = 3  # v2 .. v(1 + rounds)
    rank: int = 8
    alpha: int = 16
    lora_steps: int = 400
    lora_lr: float = 3e-3
    lora_batch: int = 32
    train_words: int = 2000
    test_words: int = 300
    corpus_bytes: int = 4_000_000  # per corpus part
    eval_batches: int = 16  # held-out language-model loss
    seed: int = 0
    start_method: str = "spawn"  # child processes for the measured jobs; spawn starts them clean


QUICK = Config(
    hidden=32,
    layers=2,
    heads=2,
    intermediate=64,
    seq=64,
    batch=8,
    pretrain_steps=40,
    evolve_steps=10,
    lora_steps=25,
    lora_batch=16,
    train_words=200,
    test_words=40,
    corpus_bytes=300_000,
    eval_batches=2,
    start_method="fork",
)


# ---------------------------------------------------------------- data


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def corpus_parts(rounds: int) -> dict[str, list[Path]]:
    """Half the modules (by a hash of the path) for v1; the other half split by hash into one part per round."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[Path]] = {f"v{n}": [] for n in range(1, rounds + 2)}
    for path in stdlib_files():
        h = zlib.crc32(str(path.relative_to(root)).encode())
        parts["v1" if h % 2 == 0 else f"v{2 + (h // 2) % rounds}"].append(path)
    return parts


def read_bytes(files: list[Path], limit: int, seed: int) -> torch.Tensor:
    """Whole modules in a seeded random order until `limit` bytes; NUL bytes dropped (NUL is the pad)."""
    order = list(files)
    random.Random(seed).shuffle(order)
    chunks, total = [], 0
    for path in order:
        data = path.read_bytes().replace(b"\x00", b"") + b"\n\n"
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    blob = b"".join(chunks)[:limit]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def split_lm(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(data) * 0.95)
    return data[:cut], data[cut:]


def task_words(text: torch.Tensor, cfg: Config) -> tuple[list[str], list[str]]:
    words = sorted(set(re.findall(rb"(?<![A-Za-z_])[a-z]{3,6}(?![A-Za-z_])", bytes(text.tolist()))))
    words = [w.decode() for w in words]
    random.Random(cfg.seed).shuffle(words)
    need = cfg.train_words + cfg.test_words
    if len(words) < need:
        raise SystemExit(f"only {len(words)} distinct words in the corpus, {need} needed")
    return words[: cfg.train_words], words[cfg.train_words : need]


def encode(pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that are -100 everywhere but on the answer bytes."""
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), PAD, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (prompt, answer) in enumerate(pairs):
        p, a = list(prompt.encode()), list(answer.encode())
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[i, : len(p) + len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_tasks(text: torch.Tensor, cfg: Config) -> dict[str, dict]:
    train_words, test_words = task_words(text, cfg)
    tasks = {}
    for name, make in TASKS.items():
        train = [make(w) for w in train_words]
        test = [make(w) for w in test_words]
        tasks[name] = {"train": encode(train), "test": encode(test), "example": "".join(test[0])}
    return tasks


# ---------------------------------------------------------------- models and training


def new_model(cfg: Config) -> transformers.LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def load_model(path: Path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def lm_batch(data: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(len(data) - cfg.seq - 1, (cfg.batch,), generator=gen)
    return torch.stack([data[s : s + cfg.seq] for s in starts.tolist()]).long()


def train_lm(model, data: torch.Tensor, cfg: Config, steps: int, lr: float, seed: int) -> list[float]:
    """Full training of every parameter on next-byte prediction (pretraining and continued pretraining)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x = lm_batch(data, cfg, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def lm_loss(model, data: torch.Tensor, cfg: Config) -> float:
    gen = torch.Generator().manual_seed(1234)
    losses = [model(input_ids=(x := lm_batch(data, cfg, gen)), labels=x).loss.item() for _ in range(cfg.eval_batches)]
    return sum(losses) / len(losses)


def lora_config(cfg: Config) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_lora(base_dir: Path, train: dict, cfg: Config, out_dir: Path) -> dict:
    """The one LoRA recipe: the same seed (so the same A init), steps, lr and batches on whichever base."""
    model = load_model(base_dir)
    torch.manual_seed(cfg.seed + 1)
    model = peft.get_peft_model(model, lora_config(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lora_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    n = len(train["input_ids"])
    model.train()
    losses = []
    for step in range(cfg.lora_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lora_steps, cfg.lora_lr)
        idx = torch.randint(n, (cfg.lora_batch,), generator=gen)
        loss = model(**{k: v[idx] for k, v in train.items()}).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.save_pretrained(out_dir)
    return {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}


@torch.no_grad()
def score(model, test: dict) -> tuple[float, float]:
    """Exact match of the answer bytes: every answer position's argmax (teacher-forced) is the answer byte, which
    is the same as greedy decoding reproducing the answer; and the mean cross-entropy of the answer bytes."""
    hits, nll, count = [], 0.0, 0
    for start in range(0, len(test["input_ids"]), 64):
        batch = {k: v[start : start + 64] for k, v in test.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        answer = target != -100
        hits.append(((logits.argmax(-1) == target) | ~answer).all(-1))
        nll += torch.nn.functional.cross_entropy(logits[answer], target[answer], reduction="sum").item()
        count += int(answer.sum())
    return torch.cat(hits).float().mean().item(), nll / count


def patched_score(base_dir: Path, adapter_dir: Path, test: dict) -> tuple[float, float]:
    model = peft.PeftModel.from_pretrained(load_model(base_dir), adapter_dir).eval()
    return score(model, test)


# ---------------------------------------------------------------- patches, porting, measured jobs


def lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Stored base tensor name -> (alpha/r) * B @ A, read from the PEFT adapter's files."""
    conf = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    scale = conf["lora_alpha"] / conf["r"]
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            deltas[name] = scale * (b.double() @ a.double())
    return deltas


def flat(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([deltas[name].flatten() for name in sorted(deltas)])


def delta_drift(adapter_1: Path, adapter_n: Path) -> dict:
    d1, dn = flat(lora_deltas(adapter_1)), flat(lora_deltas(adapter_n))
    return {
        "rel_diff": ((dn - d1).norm() / d1.norm()).item(),
        "cosine": torch.nn.functional.cosine_similarity(d1, dn, dim=0).item(),
        "norm_1": d1.norm().item(),
        "norm_n": dn.norm().item(),
    }


def stored(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def base_change(old_dir: Path, new_dir: Path) -> float:
    old, new = stored(old_dir), stored(new_dir)
    num = sum(((new[k].double() - old[k].double()) ** 2).sum() for k in old)
    den = sum((old[k].double() ** 2).sum() for k in old)
    return math.sqrt(num / den)


def jsonable(value):
    """The drift report as plain JSON, whatever object splice returns it as."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    elif hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    elif hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=str))


def port_job(adapter_dir: Path, new_base: Path, old_base: Path, out_dir: Path) -> dict:
    result = splice.port(
        str(adapter_dir), to=str(new_base), out=str(out_dir), old_base=str(old_base), scale=1.0, force=True
    )
    return {"porter": "splice.port", "drift": jsonable(getattr(result, "drift", None))}


def proc_status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else -1


def measured(job_name: str, *args) -> dict:
    """Runs in a child process: resets the peak-RSS mark (Linux clear_refs 5) after the imports, then runs one job
    and reports its wall time, the child's peak RSS and that peak above the RSS the job started at."""
    torch.set_num_threads(1)
    _ = splice.port  # the lazy import of the porting engine is not the job's cost
    job = {"port": port_job, "lora": train_lora}[job_name]
    Path("/proc/self/clear_refs").write_text("5")
    start_kb = proc_status_kb("VmRSS")
    start = time.perf_counter()
    result = job(*args)
    seconds = time.perf_counter() - start
    peak_kb = proc_status_kb("VmHWM")
    return {
        **result,
        "seconds": seconds,
        "peak_rss_mb": peak_kb / 1024,
        "rss_at_start_mb": start_kb / 1024,
        "peak_above_start_mb": (peak_kb - start_kb) / 1024,
    }


def in_child(cfg: Config, job_name: str, *args) -> dict:
    """One fresh process per job, one at a time."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(cfg.start_method)) as pool:
        return pool.submit(measured, job_name, *args).result()


# ---------------------------------------------------------------- the study


def make_bases(models: Path, cfg: Config, texts: dict[str, torch.Tensor]) -> dict:
    """v1 pretrained on its part; each v(N+1) continued from vN on part v(N+1); held-out LM losses of every base
    on v1's text (what continued pretraining forgets) and on its own round's text."""
    model = new_model(cfg)
    bases: dict[str, dict] = {}
    start = time.perf_counter()
    names = [f"v{n}" for n in range(1, cfg.rounds + 2)]
    for i, name in enumerate(names):
        train, _ = split_lm(texts[name])
        steps, lr = (cfg.pretrain_steps, cfg.pretrain_lr) if i == 0 else (cfg.evolve_steps, cfg.evolve_lr)
        losses = train_lm(model, train, cfg, steps, lr, seed=cfg.seed + 10 + i)
        model.save_pretrained(models / name)
        bases[name] = {
            "steps": steps,
            "lr": lr,
            "train_loss_last": sum(losses[-20:]) / len(losses[-20:]),
            "heldout_loss_v1_text": lm_loss(model, split_lm(texts["v1"])[1], cfg),
            "heldout_loss_own_text": lm_loss(model, split_lm(texts[name])[1], cfg),
            "seconds": time.perf_counter() - start,
        }
        if i:
            bases[name]["rel_change_from_v1"] = base_change(models / "v1", models / name)
            bases[name]["rel_change_from_previous"] = base_change(models / names[i - 1], models / name)
        print(
            f"{name}: {steps} steps, held-out loss on v1 text {bases[name]['heldout_loss_v1_text']:.3f}, "
            f"own text {bases[name]['heldout_loss_own_text']:.3f} ({bases[name]['seconds']:.0f} s)",
            flush=True,
        )
        start = time.perf_counter()
    return bases


def study_task(models: Path, cfg: Config, name: str, task: dict) -> dict:
    v1, patch_1 = models / "v1", models / f"{name}-lora-v1"
    v1_unpatched = score(load_model(v1), task["test"])
    train_v1 = in_child(cfg, "lora", v1, task["train"], cfg, patch_1)
    v1_patched = patched_score(v1, patch_1, task["test"])
    result = {
        "example": task["example"],
        "v1_unpatched": v1_unpatched[0],
        "v1_patched": v1_patched[0],
        "answer_loss": {"v1_unpatched": v1_unpatched[1], "v1_patched": v1_patched[1]},
        "train_v1": train_v1,
    }
    result["rounds"] = {}
    for n in range(2, cfg.rounds + 2):
        vn, patch_n, ported = models / f"v{n}", models / f"{name}-lora-v{n}", models / f"{name}-ported-v{n}"
        port = in_child(cfg, "port", patch_1, vn, v1, ported)
        refit = in_child(cfg, "lora", vn, task["train"], cfg, patch_n)
        scores = {
            "v1_patched": v1_patched,
            "unpatched": score(load_model(vn), task["test"]),
            "ported": score(load_model(ported), task["test"]),
            "refit": patched_score(vn, patch_n, task["test"]),
        }
        row = {
            **{k: v[0] for k, v in scores.items()},
            "answer_loss": {k: v[1] for k, v in scores.items()},
            "delta": delta_drift(patch_1, patch_n),
            "porter": port.pop("porter"),
            "drift_report": port.pop("drift"),
            "port_cost": port,
            "refit_cost": refit,
        }
        row["gap_refit_minus_ported"] = row["refit"] - row["ported"]
        result["rounds"][f"v{n}"] = row
        print(
            f"{name} v{n}: unpatched {row['unpatched']:.3f} ported {row['ported']:.3f} refit {row['refit']:.3f} "
            f"(v1 + patch {row['v1_patched']:.3f}); port {port['seconds']:.1f} s, refit {refit['seconds']:.1f} s",
            flush=True,
        )
    gaps = [r["gap_refit_minus_ported"] for r in result["rounds"].values()]
    result["gap_slope_per_round"] = slope(gaps)
    return result


def slope(values: list[float]) -> float:
    """Least-squares slope of values against 2, 3, ...: > 0 means the gap grows with N."""
    xs = list(range(2, 2 + len(values)))
    mx, my = sum(xs) / len(xs), sum(values) / len(values)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, values)) / den if den else 0.0


def run_study(out: Path, cfg: Config) -> dict:
    torch.set_num_threads(1)
    start = time.perf_counter()
    models = out / "models"
    if models.exists():
        shutil.rmtree(models)
    models.mkdir(parents=True)
    parts = corpus_parts(cfg.rounds)
    texts = {name: read_bytes(files, cfg.corpus_bytes, cfg.seed) for name, files in parts.items()}
    tasks = build_tasks(split_lm(texts["v1"])[0], cfg)
    results = {
        "config": asdict(cfg),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "porter": "splice.port",
        "data": {
            "stdlib": sysconfig.get_paths()["stdlib"],
            "modules": {name: len(files) for name, files in parts.items()},
            "bytes_used": {name: len(text) for name, text in texts.items()},
            "task_words": {"train": cfg.train_words, "test": cfg.test_words},
        },
        "parameters": sum(p.numel() for p in new_model(cfg).parameters()),
        "models": str(models),
    }
    results["bases"] = make_bases(models, cfg, texts)
    results["tasks"] = {name: study_task(models, cfg, name, task) for name, task in tasks.items()}
    results["seconds"] = time.perf_counter() - start
    return results


# ---------------------------------------------------------------- report


def table(results: dict) -> str:
    """A markdown table: one line per task and evolved base."""
    head = (
        "| task | base | v1 + patch | vN, no patch | vN + ported | vN + re-fit | re-fit - ported "
        "| \\|\\|dN-d1\\|\\|/\\|\\|d1\\|\\| | cos(dN, d1) | base moved from v1 | port s | re-fit s "
        "| port peak RSS MB (+job) | re-fit peak RSS MB (+job) |"
    )
    lines = [head, "|" + "---|" * 2 + "---:|" * 12]
    pct = "{:.1%}".format
    for name, task in results["tasks"].items():
        for base, row in task["rounds"].items():
            port, refit = row["port_cost"], row["refit_cost"]
            lines.append(
                f"| {name} | {base} | {pct(row['v1_patched'])} | {pct(row['unpatched'])} | {pct(row['ported'])} "
                f"| {pct(row['refit'])} | {row['gap_refit_minus_ported'] * 100:+.1f} pt "
                f"| {row['delta']['rel_diff']:.3f} "
                f"| {row['delta']['cosine']:.3f} | {pct(results['bases'][base]['rel_change_from_v1'])} "
                f"| {port['seconds']:.2f} | {refit['seconds']:.1f} "
                f"| {port['peak_rss_mb']:.0f} (+{port['peak_above_start_mb']:.0f}) "
                f"| {refit['peak_rss_mb']:.0f} (+{refit['peak_above_start_mb']:.0f}) |"
            )
    return "\n".join(lines)


def drift_table(results: dict) -> str:
    """splice's drift report of each port."""
    lines = [
        "| task | base | splice: base change | cos(change, update) | update / change | verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, task in results["tasks"].items():
        for base, row in task["rounds"].items():
            drift = row["drift_report"]
            lines.append(
                f"| {name} | {base} | {drift['base_change']:.4f} | {drift['cosine']:.4f} "
                f"| {drift['update_to_change']:.4f} | {drift['verdict']}: {drift['reason']} |"
            )
    return "\n".join(lines)


def summary(results: dict) -> list[str]:
    lines = []
    for name, task in results["tasks"].items():
        gaps = [f"{r['gap_refit_minus_ported'] * 100:+.1f}" for r in task["rounds"].values()]
        trend = "loses" if task["gap_slope_per_round"] > 0 else "does not lose"
        lines.append(
            f"{name}: v1 unpatched {task['v1_unpatched']:.1%}, v1 + patch {task['v1_patched']:.1%}; "
            f"re-fit minus ported by round {', '.join(gaps)} points, a slope of "
            f"{task['gap_slope_per_round'] * 100:+.2f} points per round: the ported patch {trend} ground "
            f"against re-fine-tuning as N grows"
        )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 4))
    for ax, (name, task) in zip(axes, tasks.items()):
        ns = [1, *[int(b[1:]) for b in task["rounds"]]]
        ax.plot(ns, [task["v1_patched"]] * len(ns), "k--", label=ROW_TITLES["v1_patched"])
        for row, style in (("unpatched", "o-"), ("ported", "s-"), ("refit", "^-")):
            first = task["v1_unpatched"] if row == "unpatched" else task["v1_patched"]
            ax.plot(ns, [first, *[r[row] for r in task["rounds"].values()]], style, label=ROW_TITLES[row])
        ax.set(
            title=f"{name}: test exact match", xlabel="base version N", ylabel="accuracy", ylim=(-0.02, 1.02), xticks=ns
        )
        ax.legend(fontsize=7)
    ax = axes[-1]
    for name, task in tasks.items():
        ns = [int(b[1:]) for b in task["rounds"]]
        ax.plot(ns, [r["delta"]["rel_diff"] for r in task["rounds"].values()], "o-", label=f"{name} ||dN-d1||/||d1||")
        ax.plot(ns, [r["delta"]["cosine"] for r in task["rounds"].values()], "s--", label=f"{name} cos(dN, d1)")
    ax.set(title="LoRA update drift", xlabel="base version N", xticks=ns)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON, the PNG and the models go")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a minute or less")
    parser.add_argument(
        "--evolve-lr",
        type=float,
        help=f"peak rate of continued pretraining (default {Config.evolve_lr}): how far each round moves the base",
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.evolve_lr is not None:
        cfg = replace(cfg, evolve_lr=args.evolve_lr)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_study(args.out, cfg)
    (args.out / "port_evolving.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "port_evolving.png")
    print(table(results))
    print(drift_table(results))
    for line in summary(results):
        print(line)
    print(f"porting: {results['porter']}; {results['seconds']:.0f} s in all; wrote {args.out / 'port_evolving.json'}")
    return results


if __name__ == "__main__":
    main()
