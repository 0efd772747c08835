"""The continual-learning pipeline file (`splice continual run PIPELINE.yaml`), validated before any training.

```yaml
base: path/to/model              # a Hugging Face model directory with a classification (or LM) head
registry: memory://cl            # optional: else --registry / SPLICE_REGISTRY
name: digits-cl                  # registry name: one version per task, aliases task-1 .. task-T
protocol: class-incremental      # or task-incremental (classes may repeat across tasks)
tasks:
  - name: digits-0-1
    data: examples/continual_digits.py:task_0     # MODULE:FUNCTION -> {"train": {...}, "test": {...}}
  - {name: digits-2-3, data: examples/continual_digits.py:task_1}
norms: all                       # or a (non-empty) list of substrings of the norm modules' stored names
epochs: 5                        # LayerNorm training epochs per task
lr: 0.005                        # Adam learning rates: 0 < lr <= 1
head_lr: 0.001                   # classifier rectification (second stage)
rectify: true
batch_size: 32
seed: 0                          # task i seeds torch with seed * 100003 + i (a 64-bit integer)
keys: closed-form                # or trained: key_epochs of -mean cos(f, k) with Adam from an orthogonal start
fisher: null                     # or {fraction: 0.1, granularity: entries|modules, random: false}
inference: all-classes           # or routed-classes: logits restricted to the routed slot's task classes
align: {samples: 256, epochs: 5, lr: 0.01}   # classifier alignment after each task (the default); null: off
device: auto                     # where training and evaluation run: auto (cuda when there is one), cpu, cuda
```
A data function returns `{"train": batch, "test": batch}`, each batch a dict of model inputs (tensors with the
sample on dimension 0) plus `labels` (int64 class ids, global across tasks).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from splice.continual.fisher import FisherSubset
from splice.errors import SpliceError
from splice.registry.refs import check_name
from splice.values import FiniteFloat, beside, hook_beside, validated_yaml

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SEED_STRIDE = 100_003  # task i of a pipeline seeds its generators with seed * SEED_STRIDE + i
INT64 = (-(2**63), 2**63 - 1)
LearningRate = Annotated[FiniteFloat, Field(gt=0, le=1)]  # Adam moves each entry by about lr per step


def task_seed(seed: int, index: int) -> int:
    """The seed of task `index`: a resumed run draws exactly what an uninterrupted one did."""
    return seed * SEED_STRIDE + index


class ClassifierAlignment(BaseModel):
    """After each task, the head re-trained on features sampled from a Gaussian per seen class (SLCA's classifier
    alignment, Zhang et al. 2023): each task stores the mean and covariance of the features its classes give the
    head (with the task's own slot), so no old data is kept. `samples` per class, Adam at `lr` for `epochs`."""

    model_config = ConfigDict(extra="forbid")
    samples: StrictInt = Field(default=256, ge=1)
    epochs: StrictInt = Field(default=5, ge=1)
    lr: FiniteFloat = Field(default=1e-2, gt=0, le=10)


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    data: str  # MODULE:FUNCTION or path/to/file.py:FUNCTION


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str
    name: str  # a registry name (lowercase), checked below
    registry: str | None = None
    protocol: Literal["class-incremental", "task-incremental"] = "class-incremental"
    tasks: list[TaskSpec] = Field(min_length=1)
    norms: Literal["all"] | list[str] = "all"
    epochs: StrictInt = Field(default=5, ge=1)
    lr: LearningRate = 5e-3
    head_lr: LearningRate = 1e-3
    rectify: bool = True
    rectify_epochs: StrictInt | None = Field(default=None, ge=1)  # default: epochs
    batch_size: StrictInt = Field(default=32, ge=1)
    seed: StrictInt = 0
    keys: Literal["closed-form", "trained"] = "closed-form"
    key_epochs: StrictInt = Field(default=5, ge=1)  # trained keys: epochs of -mean cos(f, k), Adam
    key_lr: LearningRate = 1e-2
    fisher: FisherSubset | None = None
    inference: Literal["all-classes", "routed-classes"] = "all-classes"
    align: ClassifierAlignment | None = Field(default_factory=ClassifierAlignment)  # null: off
    device: str = "auto"  # auto (cuda when there is a GPU), cpu, cuda, cuda:N

    @field_validator("name")
    @classmethod
    def _registry_name(cls, name: str) -> str:
        try:
            return check_name(name, "registry name")
        except SpliceError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("norms")
    @classmethod
    def _some_norms(cls, norms: str | list[str]) -> str | list[str]:
        if norms == []:
            raise ValueError(
                "an empty list tunes no norm (only the head would train); give all, or substrings of "
                "the names of the norms to tune"
            )
        return norms

    @field_validator("seed")
    @classmethod
    def _seeds_fit(cls, seed: int, info: ValidationInfo) -> int:
        count = len(info.data.get("tasks") or [None])
        if task_seed(seed, 0) < INT64[0] or task_seed(seed, count - 1) > INT64[1]:
            limit = (INT64[1] - count) // SEED_STRIDE
            raise ValueError(
                f"{seed} is out of range: task i seeds torch with seed x {SEED_STRIDE} + i, a 64-bit "
                f"integer; give a seed between -{limit} and {limit}"
            )
        return seed

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        seen = set()
        for task in tasks:
            if task.name in seen:
                raise ValueError(f"two tasks are named {task.name}")
            seen.add(task.name)
        return tasks

    @model_validator(mode="after")
    def _routed_classes_need_class_incremental(self) -> Pipeline:
        if self.inference == "routed-classes" and self.protocol != "class-incremental":
            raise ValueError(
                "inference: routed-classes is for class-incremental pipelines (task-incremental "
                "already scores each task within its own classes)"
            )
        return self

    def digest(self, tasks: int | None = None) -> str:
        """What identifies the results of the first `tasks` tasks (default: all): the settings and those tasks'
        names, not where the base, the data or the registry are (the base is checked by its fingerprint), so a
        pipeline may grow by tasks and its files may move."""
        identity = self.model_dump(mode="json", exclude={"registry", "base", "tasks", "device"})
        identity["tasks"] = [task.name for task in self.tasks[:tasks]]
        for option, before in (("inference", "all-classes"), ("align", None)):  # results made before they existed
            if identity[option] == before:
                del identity[option]
        return "sha256:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """A pipeline file parsed and validated; a one-line error naming the file and the bad entry."""
    path = Path(path)
    pipeline = validated_yaml(
        path, Pipeline, "pipeline", "a pipeline is a mapping (base, name, tasks, ...)", SpliceError
    )
    return pipeline.model_copy(
        update={
            "base": beside(path, pipeline.base),
            "tasks": [task.model_copy(update={"data": hook_beside(path, task.data)}) for task in pipeline.tasks],
        }
    )
