#!/usr/bin/env bash
# Pack what a GPU host without a package index lacks, for one run of the GPU
# check there: Ray (this project's pin, with its default, train and tune extras),
# pydantic and their dependencies, for the host's Python version, into one
# tarball. It assumes an image that already has torch, torchvision, numpy,
# pandas, pyarrow, scipy, statsmodels, matplotlib, aiohttp and grpcio (the CUDA
# images with PyTorch do). Needs pip and the network here, not there.
#     scripts/gpu_bundle.sh 3.12 .gpu/site.tar.xz
# There, in a copy of this repo (its own torch is used, not this project's pin):
#     mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site
#     PYTHONPATH=/tmp/site:$PWD python3 -m raylocal.tools.gpu_check --out "$OUT"
# Ray's Java jars, dashboard sourcemaps, RLlib, Serve and LLM are left out, and
# its binaries stripped of symbols (~40 MB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ] || ! [[ "$1" =~ ^3\.[0-9]+$ ]]; then
    echo "usage: scripts/gpu_bundle.sh PYTHON_VERSION OUT.tar.xz (e.g. 3.12 .gpu/site.tar.xz)" >&2
    exit 2
fi
version="$1"
out="$(realpath -m "$2")"
ray_pin=$(grep -o '"ray\[[a-z,]*\]==[0-9.]*"' pyproject.toml | tr -d '"')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for p in manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do platforms+=(--platform "${p}_x86_64"); done
python3 -m pip download -q --only-binary=:all: --python-version "$version" --implementation cp "${platforms[@]}" \
    --platform any -d "$work/wheels" "$ray_pin" "pydantic>=2.5"
# what the image lacks: Ray's own needs beyond the list above
lacking='^(ray-|annotated_types|colorful|aiohttp_cors|distlib|google_|googleapis|jsonschema|opencensus|opentelemetry'
lacking+='|proto_plus|protobuf|pyasn1|cryptography|cffi|pycparser|pydantic|python_discovery|referencing|rpds_py'
lacking+='|smart_open|tensorboardx|typing_inspection|virtualenv|platformdirs)'
mapfile -t wheels < <(find "$work/wheels" -name '*.whl' -printf '%f\n' | grep -E "$lacking" | sed "s|^|$work/wheels/|")
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" --platform any --target "$work/site" "${wheels[@]}"
site="$work/site"
rm -rf "$site"/ray/{jars,rllib,serve,llm,tests} "$site"/ray/dashboard/client/build/static/js/*.map
find "$site" -name __pycache__ -prune -exec rm -rf {} +
strip --strip-unneeded "$site/ray/_raylet.so" "$site/ray/core/src/ray/gcs/gcs_server" "$site/ray/core/src/ray/raylet/raylet"
mkdir -p "$(dirname "$out")"
tar cf - -C "$site" . | xz -T0 -6 >"$out"
echo "$out: $(du -h "$out" | cut -f1), ${#wheels[@]} packages for Python $version ($ray_pin)"
