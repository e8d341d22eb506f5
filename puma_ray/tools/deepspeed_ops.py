"""DeepSpeed's JIT-compiled CPU op (the shared-memory comm op every DeepSpeed engine on the CPU accelerator loads)
built once per Python environment, not once per start-up.

DeepSpeed compiles `deepspeed_shm_comm` with ninja on first use and keeps it under TORCH_EXTENSIONS_DIR; by default
every Python 3.11 environment of the machine shares one folder (~/.cache/torch_extensions/py311_cpu), and ninja
rebuilds whenever another environment's build command (its include paths) was the last one written there. Measured
here: four worktrees with their own venvs took turns rebuilding it, 40-370 s each time on 2 loaded cores, inside
the Ray Train start-up of every fit (132 s of one fit's 230 s start-up). The folder here is keyed by the
environment, so each environment builds once; `python -m puma_ray.tools.deepspeed_ops` builds it ahead
(scripts/setup.sh runs it), so a migration's first fit does not.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time


def extensions_dir() -> str:
    """This environment's own folder for torch/DeepSpeed JIT ops: keyed by its prefix, Python and torch version."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "none"
    tag = hashlib.sha256(f"{sys.prefix}|{sys.version}|{torch_version}".encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "puma_ray", "torch_extensions", tag)


def use_own_extensions_dir() -> None:
    """TORCH_EXTENSIONS_DIR for this process and the Ray processes it starts (a user's own setting wins)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())


def build_cpu_ops() -> float:
    """Builds (or loads, when built) the CPU comm op a DeepSpeed engine loads; returns the seconds it took."""
    use_own_extensions_dir()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)
    return time.perf_counter() - start


if __name__ == "__main__":
    seconds = build_cpu_ops()
    print(f"DeepSpeed CPU comm op ready in {os.environ['TORCH_EXTENSIONS_DIR']} ({seconds:.1f}s)")
