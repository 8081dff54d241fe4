#!/usr/bin/env bash
# The accelerator suite on the GPU machine: `make bench-accel`, or `bash bench/accelerator.sh` where there is no
# make. It runs on that machine's own python3 and packages (no .venv): the wheels its image lacks travel in .whl/
# (`make accel-wheels` here downloads them) and are installed into a folder of their own; jaxmr runs from this
# checkout. Arguments go to bench/accelerator.py (--quick, --budget SECONDS, --only SECTIONS, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${JAXMR_ACCEL_SITE:-/tmp/jaxmr-accel-site}
if "$PYTHON" -c "import scann, grain, litestar, uvicorn, tensorboardX" 2>/dev/null; then
  :  # this Python has jaxmr's dependencies already (a .venv): nothing to install
elif compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "note: no wheels in .whl/ (make accel-wheels downloads them) and $PYTHON lacks jaxmr's dependencies" >&2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
exec "$PYTHON" -m bench.accelerator "$@"
