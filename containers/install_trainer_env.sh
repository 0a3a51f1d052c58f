#!/usr/bin/env bash
# The trainer's environment: the project (and megatron-core) into an interpreter whose compiled packages stay
# as they are. In the image that is NGC's Python: its torch, Transformer Engine, apex, flash-attention and
# triton are compiled against each other, and replacing one breaks the others (FP8 first). The script that
# containers/Dockerfile runs; the tests run it on CPU, so the image's step is exercised without Docker.
# Usage: install_trainer_env.sh [EXTRAS]          (default: megatron; installs -e "PROJECT[EXTRAS]")
# Environment:
#   PYTHON           the interpreter to install into (default python)
#   CONSTRAINTS      where the compiled packages' pins are written (default /opt/constraints-ngc.txt)
#   NGC_CONSTRAINTS  all: NGC's own PIP_CONSTRAINT file (/etc/pip/constraint.txt, which pins every package
#                    of the image) applies too; compiled: only the compiled packages are held. NGC's pins
#                    may make the project unresolvable (pip names the package) or pull older releases of
#                    its dependencies (the last line shows the versions installed); then use compiled.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python}"
extras="${1:-megatron}"
pins="${CONSTRAINTS:-/opt/constraints-ngc.txt}"
case "${NGC_CONSTRAINTS:-all}" in
  all) base="${PIP_CONSTRAINT:-}" ;;
  compiled) base="" ;;
  *)
    echo "install_trainer_env.sh: NGC_CONSTRAINTS must be all or compiled, not '${NGC_CONSTRAINTS}'" >&2
    exit 2
    ;;
esac
"${py}" "${root}/containers/ngc_constraints.py" >"${pins}"
echo "install_trainer_env.sh: held as installed (${pins}):"
sed 's/^/  /' "${pins}"
PIP_CONSTRAINT="${base:+${base} }${pins}" "${py}" -m pip install -e "${root}[${extras}]"
# pip honours constraints; this says so, with the package's name, should a future pip or a dependency's
# metadata get around them
if ! after="$("${py}" "${root}/containers/ngc_constraints.py")" || [[ "${after}" != "$(cat "${pins}")" ]]; then
  echo "install_trainer_env.sh: a compiled package was replaced:" >&2
  diff <(cat "${pins}") <(echo "${after}") >&2 || true
  exit 1
fi
# Imported without the working directory on sys.path (the image's WORKDIR is the project): the installed
# project is what must import.
"${py}" -c "import sys; sys.path = [p for p in sys.path if p not in ('', '.')]
import importlib.metadata as m, torch, megatron.core, nemo_prorl
print('trainer: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '|',
      ', '.join(d + ' ' + m.version(d) for d in ('transformers', 'tokenizers', 'numpy', 'ray')))"
if grep -q '^transformer_engine' "${pins}"; then
  "${py}" -c "import transformer_engine.pytorch as te; print('trainer: Transformer Engine', getattr(te, '__version__', 'importable'))"
fi
