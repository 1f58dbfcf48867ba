#!/usr/bin/env bash
# The GPU checks in one run, on a CUDA machine with the project's Python packages (benchmarks/README "On a GPU"):
# the `gpu`-marked tests, then the trl back-end's tokens/s on a ~0.55B model beside plain TRL's (bench_backends.py).
# Writes what it prints under $OUT (default /tmp/flywheel-gpu).
set -uo pipefail
OUT=${OUT:-/tmp/flywheel-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
  $PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || echo "bitsandbytes: missing"
} 2>&1 | tee "$OUT/machine.txt"
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -m gpu -p no:cacheprovider -q tests/model/test_gpu.py \
  tests/model/test_evaluate.py 2>&1 | tee "$OUT/pytest-gpu.txt"
timeout "${BENCH_TIMEOUT:-300}" $PY benchmarks/bench_backends.py --random-model 0.5b --steps "${STEPS:-10}" \
  --methods dpo,kto --json "$OUT/bench_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/bench-gpu.txt"
