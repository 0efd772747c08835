"""Sweeps: searching for the best merge (issue 18). Built so far: the search space (space.py: parameters marked in a
recipe, their Optuna distributions and grids, the recipe filled in with one candidate's values) and the sweep file
(file.py: read and checked before any trial); a candidate merges into memory through merge.recipe.merged_state.
The study driver and its executors come next."""
