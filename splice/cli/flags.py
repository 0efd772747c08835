"""The command line's names for the library's parameters, in one table: library messages name a parameter in
backticks (`force=True`, `old_base`), and `with_flags` rewrites them to the flags a command-line user types."""

from __future__ import annotations

import re

from splice.errors import PARAMETER

FLAGS: dict[str, str] = {
    # every command
    "out": "--out",
    "force": "--force",
    "device": "--device",
    "storage_options": "--storage-options",
    "max_concurrency": "--max-concurrency",
    "registry": "--registry",
    "report_dir": "--report",
    # inspect
    "plot": "--plot",
    # soup, fuse, port and continual predict: the user's hooks
    "evaluate": "--eval",
    "data": "--data",
    "greedy": "--greedy",
    "strict": "--strict",
    "weights": "--weights",
    # fuse (FusionOptions)
    "align": "--align",
    "solver": "--solver",
    "reg": "--reg",
    "anchor": "--anchor",
    "samples": "--samples",
    "residual": "--residual",
    "qk": "--qk",
    "heads": "--heads",
    # patch extract, apply, export
    "base": "--base",
    "kind": "--kind",
    "rank": "--rank",
    "energy": "--energy",
    "density": "--density",
    "mask_scope": "--mask-scope",
    "mask_values": "--mask-values",
    "include": "--include",
    # patch extract --localize
    "steps": "--steps",
    "candidates": "--candidates",
    "lr": "--lr",
    "l1": "--l1",
    "head": "--head",
    "allow_base_drift": "--allow-base-drift",
    # patch merge
    "method": "--method",
    "parameters": "--param",
    "seed": "--seed",
    # port and deploy
    "old_base": "--from",
    "as_patch": "--as-patch",
    "push": "--push",
    "scale": "--scale",
    "port": "--port",
    # registry push, continual run, demo
    "wait": "--wait",
    "resume": "--resume",
    "keep": "--keep",
    # merge: multi-stage recipes
    "stage": "--stage",
    "intermediate_dir": "--intermediate-dir",
    # stats collect
    "labels": "--labels",
    "loss": "--loss",
    # sweep
    "executor": "--executor",
    "address": "--address",
    "workers": "--workers",
    "max_trials": "--max-trials",
}


def _flag(found: re.Match[str]) -> str:
    name, value = found.group(1), found.group(2)
    flag = FLAGS.get(name)
    if flag is None:
        return found.group(0)
    if value is None or value == "True":
        return flag
    quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
    return f"{flag} {value[1:-1] if quoted else value}"  # a string's quotes are Python's, not the shell's


def with_flags(message: str) -> str:
    """A library message as the command line says it: each backticked parameter the table knows becomes its flag
    (`force=True` -> --force, `out` -> --out, `old_base=OLD_BASE` -> --from OLD_BASE, `solver='emd'` ->
    --solver emd); anything else is left as it is."""
    return PARAMETER.sub(_flag, message)
