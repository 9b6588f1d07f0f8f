"""Evaluation: perplexity and fact completion (metrics.py), the report and plots (report.py)."""
