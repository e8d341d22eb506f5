"""Export a store as a 1+N system: in the open formats an import reads, or ready to serve.

The code is puma_ray/cli/export_system.py (installed as `puma-export`);
this file stays for `python jobs/export_system.py` and `ray job submit --working-dir . -- python jobs/export_system.py`.
`--help` lists the arguments.
"""
from __future__ import annotations

from puma_ray.cli.export_system import console, main

__all__ = ["main"]  # tests and notebooks call main(argv) on this module

if __name__ == "__main__":
    console()
