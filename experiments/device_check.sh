#!/usr/bin/env bash
# The one command a device session runs, in the repo root, on a lent NVIDIA H100/H200:
#
#     run(command="bash experiments/device_check.sh", timeout_s=540)          # no carry needed
#
# It runs experiments/device_check.py (kernels vs references, generate pallas vs xla, bench_kernels) and
# leaves at most six files directly in $OUT. Expected ~4-5 min on an H100; the script stops starting
# stages after 420 s (--deadline-s) and writes device_check.json after every stage, so a cut run still
# returns what it finished. Extra arguments go to device_check.py, e.g. for a shorter rerun:
#
#     run(command="bash experiments/device_check.sh --stages attention topk --deadline-s 200", timeout_s=300)
#
# ---- Preparation HERE, before the device call (costs no device time) ---------------------------------
#   1. .venv/bin/python experiments/device_check.py --out /tmp/dc_lower --lower-only
#        (~15 s: lowers every kernel case of the GPU run to Triton IR for platform "cuda"; all must pass)
#   2. nice -n 10 .venv/bin/python experiments/device_check.py --out /tmp/dc_dry --interpret --quick
#        (~2 min: the whole script end to end on CPU, kernels interpreted)
#   3. Commit or leave the tree as it is: the device copy is the working tree (tracked + untracked files
#      that git does not ignore, ~2 MB here). Nothing needs to be carried.
#
# ---- Why no wheels are carried ----------------------------------------------------------------------
# The device machine cannot reach PyPI, and carried paths are limited to 64 MiB per call. The project's
# tested JAX stack does not fit: for Python 3.12 (the device's python3 is 3.12.3),
#     jaxlib-0.10.2-cp312-cp312-manylinux_2_27_x86_64.whl            85.5 MB   (alone over the limit)
#     jax_cuda13_pjrt-0.10.2-py3-none-manylinux_2_27_x86_64.whl     124.4 MB
#     jax_cuda13_plugin-0.10.2-cp312-cp312-manylinux_2_27_x86_64.whl  7.5 MB
#     jax_cuda12_pjrt-0.10.2 174.4 MB, jax_cuda12_plugin-0.10.2 8.1 MB, plus the nvidia-*-cu12 libraries
#     (cudnn, cublas, ... several hundred MB more), jax-0.10.2-py3-none-any.whl 3.2 MB
# (sizes as pip reported them with
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#       jax==0.10.2 jaxlib==0.10.2 jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2
#  i.e. >= 220 MB for the smallest CUDA-13 set that reuses the image's nvidia libraries.)
# So this runs on what the image ('cuda') already holds: python3 = /opt/torch/.venv/bin/python3 with
# jax 0.11.2, jaxlib 0.11.2, jax-cuda13-plugin/pjrt 0.11.2, flax, optax, orbax-checkpoint, numpy,
# safetensors, tokenizers, jinja2, tqdm, matplotlib (KINDS.md, read 2026-11). The project imports nothing
# else at module level (gguf is imported only by the GGUF loader, which this check never calls). On
# CPU here, with Python 3.12.1 + jax 0.11.2 + flax 0.12.12 + numpy 2.5.5, the kernel tests pass (the two
# test_kernel_lowers_for_device[cuda] cases need a GPU under jax 0.11) and the dry run passes.
# If a later image lacks a pure-Python package, download it here with the command above into .whl/
# (`echo /.whl/ >> .git/info/exclude` first; .gitignore already ignores /.whl/), name ".whl" in carry,
# and this script installs it into /tmp/site before running.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-/tmp/device_check_out}"
mkdir -p "$OUT"

PY="${PYTHON:-}"
for cand in python3 /opt/torch/.venv/bin/python3; do
  [ -n "$PY" ] && break
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import jax" >/dev/null 2>&1; then PY="$cand"; fi
done
if [ -z "$PY" ]; then
  echo "no python3 with jax found" >&2
  exit 3
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing carried wheels: $(ls .whl)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "python: $(command -v "$PY") $("$PY" -V 2>&1)"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
export PYTHONUNBUFFERED=1
# Outer guard only: device_check.py keeps its own 420 s deadline and writes its JSON after each stage.
timeout -s INT 520 "$PY" experiments/device_check.py --out "$OUT" "$@"
rc=$?
echo "device_check exit status: $rc; files in $OUT:"
ls -la "$OUT"
exit $rc
