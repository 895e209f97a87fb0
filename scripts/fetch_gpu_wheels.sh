#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machine lacks (Python 3.12, manylinux x86-64), at the versions this
# checkout's venv uses. That machine already has torch, triton, torchvision, numpy, pillow, pytest, filelock,
# requests (+urllib3, idna, certifi, charset-normalizer), tqdm and typing-extensions; it lacks pydantic (+core,
# annotated-types, typing-inspection) and pycocotools. scripts/gpu_session.sh installs them with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
specs=$($PY - <<'EOF'
from importlib.metadata import version
# typing-extensions too: pydantic needs a newer one than the machine may hold
for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "pycocotools"):
    print(f"{n}=={version(n)}")
EOF
)
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
rm -f .whl/*.whl  # one version of each, or the install on the GPU machine stops
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d .whl $specs
ls -l .whl
