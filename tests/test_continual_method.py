"""The continual method in its own room (splice.continual): a Python user trains and routes a LayerNormBank with the
method's pieces alone, with no registry and no pipeline file, and importing them loads neither."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from continual_tasks import TASKS, task, unlabelled_batch
from test_continual import TASK_FILE, tiny_vit

from splice.continual.bank import LayerNormBank
from splice.continual.data import load_task
from splice.continual.metrics import summarize
from splice.continual.model import classification_head, head_parameters, load_model
from splice.continual.train import Schedule, Training, evaluate, rectify_head, task_key, train_slot

METHOD = ("align", "bank", "data", "fisher", "metrics", "model", "train")


def test_the_method_loads_no_registry_and_no_pipeline():
    code = (
        f"import sys; import {', '.join(f'splice.continual.{name}' for name in METHOD)}; "
        "print(sorted(m for m in sys.modules if m.startswith(('splice.registry', 'splice.workflows', "
        "'splice.adapters', 'splice.merge'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


def test_a_bank_trained_and_routed_without_a_registry(tmp_path):
    bank = LayerNormBank(load_model(tiny_vit(tmp_path / "vit"))).freeze_backbone()
    head = head_parameters(bank.model, classification_head(bank.model))
    tasks = [load_task(f"t{i}", f"{TASK_FILE}:task_{i}") for i in range(TASKS)]
    schedule = Schedule(epochs=3, lr=0.05, head_lr=0.05, rectify_epochs=3, batch_size=8)
    matrix = []
    for index, data in enumerate(tasks):
        torch.manual_seed(index)
        training = Training(schedule, torch.Generator().manual_seed(index))
        slot = bank.add_task(key=task_key(bank, data, schedule, training.generator))
        tuned = bank.task_parameters(slot)
        before = [parameter.detach().clone() for parameter in tuned]
        train_slot(bank, slot, tuned, head, data, training)
        rectify_head(bank, head, data, training)
        assert all(not torch.equal(parameter, value) for parameter, value in zip(tuned, before))
        matrix.append(evaluate(bank, tasks[: index + 1], "task-incremental", schedule.batch_size).accuracy)
    routed = bank.route(**unlabelled_batch())
    truth = torch.arange(TASKS).repeat_interleave(task(0)["test"]["labels"].shape[0])
    assert float((routed == truth).float().mean()) > 0.75  # chance: 1/3
    assert summarize(matrix).final_average_accuracy > 0.7, matrix  # chance: 1/2 (within each task)
