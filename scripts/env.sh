#!/usr/bin/env bash
# Create the project's virtual environment if missing and install nepenthe into it (idempotent).
# Sourced by main.sh and test.sh; sets PY to the environment's python.
#   NEPENTHE_VENV   where the environment lives (default: .venv in the repository)
#   NEPENTHE_TORCH  the torch requirement to install when torch is missing (default: torch==2.13.0,
#                   the CPU build on this project's machines; a GPU machine keeps its own torch)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEPENTHE_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[nepenthe] creating virtual environment $VENV" >&2
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.nepenthe-install-stamp"
# Reinstall only when packaging files or the compiled extension's sources changed since the last install.
WANT="$( (cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/scripts/env.sh"; find "$ROOT/csrc" -type f | sort | xargs cat) | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[nepenthe] installing dependencies into $VENV (first run: a few minutes)" >&2
    pip_install() {  # quiet, minus this machine's notices about absent local index folders
        "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    }
    "$PY" -c "import setuptools, wheel, ninja" 2>/dev/null || pip_install "setuptools>=64" wheel ninja
    if ! "$PY" -c "import torch" 2>/dev/null; then
        pip_install "${NEPENTHE_TORCH:-torch==2.13.0}"
    fi
    # --no-build-isolation: build the C++ extension nepenthe._C against the torch installed above
    # instead of downloading another (about a minute on 2 cores)
    pip_install "numpy<2.4" --no-build-isolation -e "$ROOT[cli,plot,dev,export]"
    # torchvision, timm and Lightning, for the compatibility tests on their unmodified models and
    # trainer: the torchvision release made for the torch installed above (an unpinned one would
    # replace torch with another, multi-GB build). Optional: without them (e.g. offline) those tests skip.
    TORCH_RELEASE="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
    pip_install --retries 1 --timeout 30 torchvision "torch==$TORCH_RELEASE" ||
        echo "[nepenthe] no torchvision for torch $TORCH_RELEASE: the tests on torchvision's models will skip" >&2
    pip_install --retries 1 --timeout 30 "timm>=1.0" "lightning>=2.2" "torch==$TORCH_RELEASE" \
        "torchvision==$("$PY" -c 'import importlib.metadata as m; print(m.version("torchvision"))' 2>/dev/null || echo 0)" ||
        echo "[nepenthe] no timm / Lightning: the tests on their models and trainer will skip" >&2
    echo "$WANT" > "$STAMP"
fi
export PY ROOT
