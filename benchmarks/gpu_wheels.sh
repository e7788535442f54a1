#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what benchmarks/gpu_session.sh installs on a lent GPU
# machine: the packages its image lacks, at the versions of this project's .venv,
# for CPython 3.12 on x86_64, and a wheel of decodekit itself built from this tree.
#   bash benchmarks/gpu_wheels.sh     (then pass `carry: [".whl"]` to the device call)
set -eu
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in diffusers importlib_metadata DeepCache cache_dit pydantic pydantic_core annotated-types \
        typing-inspection typing_extensions; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$name==$(version "$name")"
done
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl . >/dev/null
ls .whl
