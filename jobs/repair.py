"""Repair (or polish) a finished migration's users into a new verified store version.

The code is puma_ray/cli/repair.py (installed as `puma-repair`); this file stays for `python jobs/repair.py` and
`ray job submit --working-dir . -- python jobs/repair.py`. `--help` lists the arguments.
"""
from __future__ import annotations

from puma_ray.cli.repair import console, main

__all__ = ["main"]  # tests and notebooks call main(argv) on this module

if __name__ == "__main__":
    console()
