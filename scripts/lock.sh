#!/usr/bin/env bash
# `make lock`: resolve the newest versions pyproject.toml allows, in a fresh venv, and write them to
# constraints.txt, the one lock every install path uses (make install / .ci/run, docker/Dockerfile, the
# README). An upgrade is this script plus a deliberate commit of its diff, after `make test` passes on it.
#
# Why a pip constraints file and not uv's lock: the CPU build of torch that CI and every developer machine
# install (torch==2.13.0) lies on local disk where only pip looks; uv would fetch a ~3 GB CUDA build.
# A constraints file also leaves extras as they are: `-c constraints.txt '.[train]'` installs only what the
# train extra needs, at the versions the full dev+bench resolution chose.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
pip="$tmp/venv/bin/python -m pip"
$pip install -q --upgrade pip setuptools
$pip install -q torch==2.13.0
$pip install -q --no-build-isolation -e '.[dev,bench]'
{
    echo "# The lock of every install path: pip install -c constraints.txt ... (make install, .ci/run, docker/)."
    echo "# Written by \`make lock\` (scripts/lock.sh) on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" -V);"
    echo "# do not edit by hand. Covers the dev and bench extras; the sglang extra (CUDA only) is not resolved here."
    # torch: the CPU build's local label (+cpu) dropped, so the same line takes the CUDA build in the image.
    $pip freeze --all --exclude-editable | grep -viE '^(userloop|wheel)[=@ ]' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins); run make test, then commit it"
