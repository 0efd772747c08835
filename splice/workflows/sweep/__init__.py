"""Sweeps: searching for the best merge (issue 18).

- space.py: parameters marked in a recipe, their Optuna distributions and grids, a recipe filled per candidate;
- file.py: the sweep file, read and checked before any trial;
- candidate.py: one candidate merged into memory and scored, where a worker runs it;
- executors.py: where candidates run (this process, a local process pool, Ray tasks);
- study.py: the Optuna study in its journal, driven by ask/tell, exact budget, resumable;
- greedy.py: a greedy soup with a speculative accept/reject pass;
- results.py: the results files and plots; run.py: `splice.sweep`, which puts them together.
"""
