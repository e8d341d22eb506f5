"""Reports a person reads: report.md with PNG plots beside report.json, for migrate, sweep and benchmark runs."""
