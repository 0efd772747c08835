"""Sweeps: searching for the best merge (issue 18). So far the search space: parameters marked in a recipe, their
Optuna distributions and grids, and the recipe filled in with one candidate's values (space.py)."""
