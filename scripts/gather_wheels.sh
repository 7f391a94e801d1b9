#!/usr/bin/env bash
# Gather the wheels the GPU machine lacks into .whl/ (git-ignored), for benchmarks/gpu_check.sh.
#
# The GPU machine (Python 3.12, x86-64, no network) ships torch, transformers, peft, accelerate,
# safetensors, tokenizers, fsspec, jinja2, PyYAML, numpy, psutil, py-cpuinfo, msgpack, einops,
# ninja, tqdm and pyarrow, but not DeepSpeed nor pydantic and what they need. The benchmark path
# needs neither Ray (single-process launcher) nor `datasets` (no dataset cache is used), so
# neither is carried. Versions are the ones installed in this checkout's venv, so both machines
# run the same code. DeepSpeed is source-only on PyPI: its wheel is built here with
# DS_BUILD_OPS=0 (pure Python; its CUDA ops are JIT-built on first use there).
#
#   scripts/gather_wheels.sh            # download and build into .whl/ (needs network), check size
#   scripts/gather_wheels.sh --list     # print NAME==VERSION of what would be gathered, no network
#   scripts/gather_wheels.sh --dry-run  # print the commands instead of running them
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${WHEEL_DIR:-.whl}
LIMIT_MIB=64
MODE=gather
case "${1:-}" in
  --list) MODE=list ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: $0 [--list|--dry-run]" >&2; exit 2 ;;
esac

# Binary wheels for CPython 3.12 on manylinux x86-64 (pydantic-core is compiled), then DeepSpeed.
BINARY=(pydantic pydantic-core annotated-types typing-inspection typing-extensions pydantic-settings python-dotenv hjson
        cryptography cffi pycparser)
SOURCE=(deepspeed)

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

pins=()
for name in "${BINARY[@]}" "${SOURCE[@]}"; do
  pins+=("$name==$(version "$name")")
done

if [[ $MODE == list ]]; then
  printf '%s\n' "${pins[@]}"
  exit 0
fi

run() {
  if [[ $MODE == dry ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
run mkdir -p "$DEST"
for pin in "${pins[@]:0:${#BINARY[@]}}"; do
  run "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$pin"
done
for pin in "${pins[@]:${#BINARY[@]}}"; do
  run env DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$pin"
done

if [[ $MODE == dry ]]; then
  exit 0
fi
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"/*.whl
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $DEST"
if (( total >= LIMIT_MIB * 1024 * 1024 )); then
  echo "the wheels exceed ${LIMIT_MIB} MiB: the device tool would refuse the working tree" >&2
  exit 1
fi
