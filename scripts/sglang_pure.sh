#!/usr/bin/env bash
# Install SGLang 0.5.19's pure-Python parts into .cache/sglang-0.5.19 for tests/trainer/test_sglang_contract.py:
# the sidecar's command lines are checked by SGLang's own argument parser and server-argument checks, and the
# client's request bodies by SGLang's own request structs (sglang.srt.managers.io_struct). SGLang itself needs
# CUDA and cannot run here; these parts import without it (with tests/sglang_pure/shims.py).
#
# --no-deps with the hash-pinned files of scripts/sglang-pure.lock (the lock: change both together), into a
# folder of its own: nothing enters .venv, and its transformers (SGLang's pin) is seen only by the checker's
# subprocess. Idempotent: a stamp of the lock's checksum skips a second install. 12-30 s and 283 MB
# (42 MB downloaded). Without it those tests skip and say to run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
lock=scripts/sglang-pure.lock
target=.cache/sglang-0.5.19
stamp="$target/.installed-$(cksum < "$lock" | cut -d' ' -f1)"
if [ -f "$stamp" ]; then
    echo "sglang_pure: $target is current"
    exit 0
fi
rm -rf "$target"
start=$(date +%s)
"$PY" -m pip install -q --root-user-action=ignore --no-deps --only-binary=:all: --require-hashes --target "$target" -r "$lock"
touch "$stamp"
echo "sglang_pure: installed into $target in $(( $(date +%s) - start )) s ($(du -sh "$target" | cut -f1))"
