#!/usr/bin/env bash
# Rehearse the paper pipeline on CPU through the shipped configs' own paths (sft -> rl -> validate -> rc -> eval),
# after the set-up: see scripts/rehearse.py for the commands it types and its options (--devices 2, --layout ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/rehearse.py "$@"
