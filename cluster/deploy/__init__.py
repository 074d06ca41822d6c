"""Deployment: what a topology needs per GPU (`memory.py`), the `ray up` configs that
host it (`render.py`), and whether a running cluster can (`check.py`)."""
