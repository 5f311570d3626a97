"""Evaluation harness: the paper's Table 2 on any model (see harness.py, plugins.py, report.py)."""
