#!/usr/bin/env bash
# The offline GPU check: seven measurements of the training code on one GPU, written as one JSON (what each measures:
# src/qed_lightning/gpu_check/__init__.py). Made for the lent GPU machine: Python 3.12, torch, transformers and
# Lightning, no network, no DeepSpeed. DeepSpeed and the other missing pure-Python packages travel as wheels in .whl/,
# prepared on a CPU machine by `bash scripts/gpu_check_wheels.sh` (git-ignored: carry it with the working tree); only
# the wheels whose package does not import here are installed, into a temporary directory on PYTHONPATH.
# Each section runs within its own time budget (printed first; 440 s in all on the GPU, a 455 s cap): one past its
# budget is cut and reported as cut, the others still run, so the check ends within 8 minutes on one H100. The
# `timeout` below only backs that up (the JSON keeps what was measured by then).
#   bash scripts/gpu_check.sh [--out runs/gpu_check/results.json] [--sections gemm sft memory strategies ...]
#   bash scripts/gpu_check.sh --sections strategies --budget zero3=120   # rerun a cut part with more time
#   bash scripts/gpu_check.sh --dry-run    # the same code with tiny shapes on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ " $* " != *" --dry-run "* ]] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi missing or failing); run it on a GPU machine, or with --dry-run." >&2
  exit 2
fi
SITE=$(mktemp -d)/site
if compgen -G ".whl/*.whl" >/dev/null; then
  # wheel file name -> import name; install only what this Python cannot import yet
  missing=$("$PY" - <<'PYEOF'
import glob, importlib.util, os
names = {"py_cpuinfo": "cpuinfo"}
for path in sorted(glob.glob(".whl/*.whl")):
    dist = os.path.basename(path).split("-")[0].lower()
    if importlib.util.find_spec(names.get(dist, dist)) is None:
        print(path)
PYEOF
)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" $missing
  fi
fi
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the backstop past the Python cap (455 s on the GPU, 700 s for the dry run on CPU)
if [[ " $* " == *" --dry-run "* ]]; then export DS_ACCELERATOR=cpu LIMIT=730
else export DS_ACCELERATOR=cuda LIMIT=470; fi
exec timeout --signal=INT --kill-after=20 "$LIMIT" "$PY" scripts/gpu_check.py "$@"
