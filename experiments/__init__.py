"""Experiments on a real (small) model through the library's public functions.

Run each script from the repository root as a module: `python -m experiments.fidelity --quick`.
"""
