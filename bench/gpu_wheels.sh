#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the device machine, fetched here into bench/wheels/
# (ignored by git) so that they travel with the working tree: `carry: ["bench/wheels"]`.
#
# That machine has torch (CUDA), transformers, peft, accelerate, pyarrow, pandas, xxhash and
# fsspec, and no network. Missing there: trl and datasets (SFT and DPO, both sides), dill and
# multiprocess (datasets' own), pydantic and its parts (every rlaif stage config), and
# bitsandbytes (the QLoRA part). Wheels for the device's Python (3.12, x86-64 manylinux);
# about 48 MB, of the 64 MiB that may travel with the working tree. NO_BNB=1 leaves
# bitsandbytes (43 MB) out: the QLoRA part then says "skipped: bitsandbytes not installed".
#
#     bash bench/gpu_wheels.sh            # then, on the device (docs/benchmarks.md, GPU check):
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site bench/wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
DEST=bench/wheels
WHEELS=(
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
)
if [[ "${NO_BNB:-0}" != 1 ]]; then
    WHEELS+=(bitsandbytes==0.50.2)
fi

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"

bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "$DEST: $(ls "$DEST" | wc -l) wheels, $((bytes / 1048576)) MiB;" \
    "working tree $((tree / 1048576)) MiB; together at most 64 MiB may travel"
if ((bytes + tree > 64 * 1048576)); then
    echo "too large to travel: run with NO_BNB=1" >&2
    exit 1
fi
