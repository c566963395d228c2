"""Benchmarks of the mesh, run with `llmesh bench overhead|stream|swap|shadow|resources|all`.

Each module has `run(layout, out, quick) -> dict`: it measures against a baseline taken in the same
run (these machines are noisy), writes its plot under `out`, and returns its JSON figures.
"""
