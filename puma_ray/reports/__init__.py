"""Reports a person reads: report.md with PNG plots beside report.json (markdown.py: migrate, sweep; benchmark.py:
benchmark.md)."""
