"""Convert every user of the source store(s) with a fitted adapter into a complete, verified target store.

The code is puma_ray/cli/convert.py (installed as `puma-convert`); this file stays for `python jobs/convert.py` and
`ray job submit --working-dir . -- python jobs/convert.py`. `--help` lists the arguments.
"""
from __future__ import annotations

from puma_ray.cli.convert import console, main

__all__ = ["main"]  # tests and notebooks call main(argv) on this module

if __name__ == "__main__":
    console()
