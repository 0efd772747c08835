"""Which registry version holds each task of a pipeline: task i (1-based, as the run counts them) has the alias
`task-i`. Registries written before that numbering call the first task `task-0` (and task i `task-(i-1)`); they
keep their aliases, are read as they are, and a resumed run goes on in their numbering."""

from __future__ import annotations

import re
from collections.abc import Mapping

from splice.errors import SpliceError
from splice.registry.store import Registry

LEGACY_FIRST = "task-0"  # only a registry of the old 0-based numbering has it


def alias_of(index: int, legacy: bool = False) -> str:
    """The alias of the task at 0-based `index` (the `task` its version's settings record)."""
    return f"task-{index if legacy else index + 1}"


def index_named(alias: str | None, legacy: bool = False) -> int | None:
    """The 0-based task index a task alias names (`task-3`: 2, or 3 in a registry of the old numbering); None for
    any other alias."""
    found = re.fullmatch(r"task-(\d+)", alias or "")
    if found is None:
        return None
    return int(found.group(1)) - (0 if legacy else 1)


def uses_legacy_aliases(aliases: Mapping[str, object]) -> bool:
    return LEGACY_FIRST in aliases


def check_aliased_task(store: Registry, name: str, alias: str, version: int, settings: Mapping, index: int) -> None:
    """The version `alias` points at must be the task the alias names: an alias moved onto another task's version
    would put that task's slot in this one's place."""
    task = settings.get("task")
    if task == index:
        return
    held = f"task {int(task) + 1} ({settings.get('task_name')})" if isinstance(task, int) else "no task"
    right = [
        m.version
        for m in store.versions(name)
        if m.meta.settings.get("task") == index
        and m.meta.settings.get("pipeline_settings") == settings.get("pipeline_settings")
    ]
    target = f"{name}@{max(right)}" if right else f"{name}@VERSION (the version of task {index + 1})"
    raise SpliceError(
        f"alias {alias} of {name} points to {name}@{version}, which holds {held}, not task "
        f"{index + 1}; move it back with `splice registry tag {target} {alias}`"
    )
