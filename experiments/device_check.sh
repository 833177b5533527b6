#!/usr/bin/env bash
# The one command a device session runs, in the repository root of the lent GPU machine:
#
#     run(command="bash experiments/device_check.sh", timeout_s=540)      # nothing to carry
#
# It runs `python -m experiments.device_check --out $OUT` (see its docstring): the kernel tests natively,
# bench_kernels, bench_decode_device; six files come back in $OUT (device_check_SLUG.json/.log,
# bench_kernels_SLUG.json/.png, bench_decode_device_SLUG.json/.png) and also land in experiments/results/.
# Stages stop starting after 420 s; the JSON is rewritten after each stage, so a cut run keeps what it did.
# Extra arguments go to device_check.py, e.g. a shorter rerun of one stage:
#
#     run(command="bash experiments/device_check.sh --stages bench_decode --deadline-s 300", timeout_s=400)
#
# Rehearse here first, at no device cost (CPU, kernels interpreted, every size shrunk; a few minutes):
#
#     .venv/bin/python -m experiments.device_check --rehearse
#
# The device runs the image's own Python (python3 3.12 with jax/jaxlib 0.11.2 and the CUDA 13 plugin;
# nothing can be installed there). Everything this run imports is on that image (KINDS.md's package
# list): jax, numpy, flax, safetensors, tokenizers, jinja2, tqdm, matplotlib, pytest, hypothesis. gguf and
# orbax-checkpoint are imported only by checkpoint loaders this run never calls, and the model is random
# weights with the checkpoint's shapes, so no model file travels either. device_check.json's
# probe.missing lists any needed package the image lacks; carry such a pure-Python one as a wheel in .whl/
# (`echo /.whl/ >> .git/info/exclude`, pip download as /work/.library/device/README.md says, carry=[".whl"])
# and this script installs it into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
for cand in python3 /opt/torch/.venv/bin/python3; do
  [ -n "$PY" ] && break
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import jax" >/dev/null 2>&1; then PY="$cand"; fi
done
[ -n "$PY" ] || { echo "no python3 with jax found" >&2; exit 3; }

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing carried wheels: $(ls .whl)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "python: $(command -v "$PY") $("$PY" -V 2>&1)"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
export PYTHONUNBUFFERED=1
# Outer guard only: device_check.py keeps its own deadline and per-stage limits.
timeout -s INT 500 "$PY" -m experiments.device_check ${OUT:+--out "$OUT"} "$@"
rc=$?
echo "device_check exit status: $rc"
[ -n "${OUT:-}" ] && ls -la "$OUT"
exit $rc
