"""Migrate every user's soft prompt from the source model(s) to a new target model with PUMA.

The code is puma_ray/cli/migrate.py (installed as `puma-migrate`); this file stays for `python jobs/migrate.py` and
`ray job submit --working-dir . -- python jobs/migrate.py`. `--help` lists the arguments.
"""
from __future__ import annotations

from puma_ray.cli.migrate import console, main

__all__ = ["main"]  # tests and notebooks call main(argv) on this module

if __name__ == "__main__":
    console()
