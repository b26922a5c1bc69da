#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU. Extra arguments go to pytest.
#   bash scripts/test.sh          the whole suite (CI)
#   bash scripts/test.sh --fast   tests/unit without the `slow` marker (no engine, no server): for every edit
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--fast" ]; then
  shift
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=300 -m "not slow" tests/unit "$@"
fi
# the report's browser test drives Debian's chromium headless (tests/integration/test_report_browser.py); install it
# once, quietly, where apt can (CI runs as root on Debian); without it that test is skipped and says why
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[test] installing chromium (apt) for the report's browser test..."
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "[test] could not install chromium: the browser test will be skipped"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=25 tests "$@"
