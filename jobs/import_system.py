"""Import your own 1+N system (docs/bring-your-own.md) as a verified store bound to your model.

The code is puma_ray/cli/import_system.py (installed as `puma-import`);
this file stays for `python jobs/import_system.py` and `ray job submit --working-dir . -- python jobs/import_system.py`.
`--help` lists the arguments.
"""
from __future__ import annotations

from puma_ray.cli.import_system import console, main

__all__ = ["main"]  # tests and notebooks call main(argv) on this module

if __name__ == "__main__":
    console()
