#!/usr/bin/env bash
# The prepared GPU check (issue 19): at most 8 minutes on one H100/H200 with PyTorch preinstalled and no
# internet. Figures go to $OUT/gpu_check.json (OUT: the device tool's output folder; default benchmarks/out).
#   make gpu-wheels GPU_PY=3.12        # here, once: the pure-Python dependencies, into benchmarks/wheels
#   bash benchmarks/gpu_check.sh       # there (the device tool's run: carry=["benchmarks/wheels"])
# Without a GPU it says so and exits 0 at once. Arguments go to benchmarks/gpu_check.py (e.g. --sections env).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
py="${PYTHON:-python3}"
if ! "${py}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here (or no PyTorch); nothing to check"
  exit 0
fi
if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
  # Into a folder of their own on PYTHONPATH, not a virtualenv: the machine's python3 may itself be a
  # virtualenv, whose torch a nested one would not see. No torch among the wheels, --no-deps: never replaced.
  site="$(mktemp -d /tmp/prorl-gpu-check-XXXXXX)"
  if "${py}" -m pip install --quiet --no-index --no-deps --target "${site}" benchmarks/wheels/*.whl; then
    export PYTHONPATH="${site}${PYTHONPATH:+:${PYTHONPATH}}"
  else
    echo "gpu_check: the wheels do not fit this Python ($("${py}" -V)); running with what is installed" >&2
  fi
fi
"${py}" -c "import torch; print('gpu_check: torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
exec "${py}" benchmarks/gpu_check.py --out "${out}" "$@"
