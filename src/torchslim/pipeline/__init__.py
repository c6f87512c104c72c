"""Recipes, the stage runner, guard rails and reports."""
