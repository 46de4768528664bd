#!/usr/bin/env bash
# Builds the benchmark environment .venv-bench (RecBole 1.2.1; pytorch-lifestream 0.7.0 for CoLES), separate
# from .venv because RecBole needs numpy<2, pandas<2.3 and setuptools<81. Idempotent: the venv is created
# only if missing, and the install is skipped while .venv-bench/.installed is newer than pyproject.toml.
#
#     bash benchmarks/bench-env.sh            # then: .venv-bench/bin/python benchmarks/recbole_sasrec.py ...
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-bench
STAMP="$VENV/.installed"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# keep git from ever listing the venv (as Python >= 3.13's venv does by itself)
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    # torch first and pinned: an unpinned torch (RecBole and thop ask for any) pulls a multi-GB CUDA build
    "$VENV/bin/pip" install --quiet torch==2.13.0
    "$VENV/bin/pip" install --quiet -e '.[bench]'
    touch "$STAMP"
fi
