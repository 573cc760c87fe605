"""The benchmark's parts, one job a module; `bench/run.py` runs them."""
