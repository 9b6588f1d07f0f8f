"""Evaluation: perplexity, fact and chat accuracy, held-out reply loss and preference margins
(metrics.py, chat_eval.py), multiple-choice benchmarks (benchmark.py), the report and plots (report.py),
and figures quoted in hand-written reports (quotes.py)."""
