#!/usr/bin/env bash
# The prepared GPU check (issue 19): at most 8 minutes on one H100/H200 with PyTorch preinstalled and no
# internet. Figures go to $OUT/gpu_check.json (OUT: the device tool's output folder; default benchmarks/out).
#   make gpu-wheels                    # here, once: the dependencies (Python 3.11-3.13), into benchmarks/wheels
#   bash benchmarks/gpu_check.sh       # there (the device tool's run: carry=["benchmarks/wheels"])
# Without a GPU it says so and exits 0 at once, unless GPU_CHECK_ON_CPU=1 (make gpu-rehearsal: the same steps on
# CPU with tiny shapes). Arguments go to benchmarks/gpu_check.py (e.g. --sections env).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
py="${PYTHON:-python3}"
if [[ "${GPU_CHECK_ON_CPU:-0}" == 1 ]]; then
  # the rehearsal (make gpu-rehearsal): this script's steps on CPU, every section with tiny shapes
  set -- --device cpu --quick "$@"
elif ! "${py}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here (or no PyTorch); nothing to check"
  exit 0
fi
if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
  # Into a folder of their own on PYTHONPATH, not a virtualenv: the machine's python3 may itself be a
  # virtualenv, whose torch a nested one would not see. No torch among the wheels, --no-deps: never replaced.
  # The folder holds wheels for several Pythons; pip takes this one's for each requirement.
  site="$(mktemp -d /tmp/prorl-gpu-check-XXXXXX)"
  trap 'rm -rf "${site}"' EXIT
  if "${py}" -m pip install --quiet --no-index --no-deps --only-binary=:all: --find-links benchmarks/wheels \
    --target "${site}" -r requirements/gpu-check.txt -r requirements/gpu-check-sdist.txt; then
    export PYTHONPATH="${site}${PYTHONPATH:+:${PYTHONPATH}}"
  else
    echo "gpu_check: the wheels could not be installed for this Python ($("${py}" -V 2>&1); pip above says why);" \
      "running with what is installed" >&2
  fi
fi
"${py}" -c "import torch; print('gpu_check: torch', torch.__version__, 'on',
                              torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')"
"${py}" benchmarks/gpu_check.py --out "${out}" "$@"
