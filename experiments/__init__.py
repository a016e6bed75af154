"""Measurements: the studies, the cost benchmark, the ground truth, sweeps. Run from the repository root as
`python -m experiments.study ...`; results beside this file."""
