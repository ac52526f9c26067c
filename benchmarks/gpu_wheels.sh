#!/usr/bin/env bash
# Download, here (where pip reaches PyPI), the wheels the GPU benchmark needs on the H200 device machine and
# that its image lacks (/work/.library/device/KINDS.md): cp312, manylinux x86_64, into .whl/ (git-ignored
# through .git/info/exclude). The device command (benchmarks/gpu.py's docstring) installs them with
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and carries `.whl` (64 MiB limit).
#
#   bash benchmarks/gpu_wheels.sh                       # userloop's run and TRL (~4.7 MB)
#   bash benchmarks/gpu_wheels.sh --no-trl              # userloop's run only (pydantic; ~2.8 MB)
#   bash benchmarks/gpu_wheels.sh --with-transformers   # + transformers 5.23.0 (~18 MB in all)
#
# Why each one (versions: the ones the CPU checks here ran with):
# - pydantic, pydantic-core, annotated-types, typing-inspection: trainer.config (any `launcher run`);
#   typing-extensions: pydantic 2.14 needs >= 4.16, the image's version is not known here;
# - trl, datasets, dill, multiprocess: benchmarks/grpo_trl.py (TRL imports datasets);
# - with --with-transformers, transformers 5.23.0: the version TRL 1.16 and userloop were checked with here.
#   Not by default: the image's 5.17.0 satisfies both (TRL >= 4.56.2, userloop >= 5.0), and 5.23.0's import-time
#   version check needs regex >= 2025.10.22 among others, unread on the image.
# Unread on the image and left to it: datasets 5.2 asks for pyarrow >= 24 and fsspec <= 2026.9.0 (the device
# command prints those versions first).
# Not needed for a run without an API (checked by importing with them made absent): litellm, kubernetes,
# jsonschema, referencing, helm-python-sdk.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
)
if [[ "${1:-}" != "--no-trl" ]]; then
  WHEELS+=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
fi
if [[ "${1:-}" == "--with-transformers" ]]; then
  WHEELS+=(transformers==5.23.0)
fi

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

ls -l .whl
total=$(du -sk .whl | cut -f1)
echo "total: ${total} KiB in .whl (limit with the working tree: 65536 KiB)"
if ((total > 60000)); then
  echo "too large to carry beside the working tree" >&2
  exit 1
fi
