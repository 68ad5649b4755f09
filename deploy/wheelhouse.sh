#!/usr/bin/env bash
# Collect every wheel the image needs, at the versions requirements.lock pins, into one folder for an
# offline (air-gapped) image build:
#   deploy/wheelhouse.sh .whl && docker build --build-arg WHEELS=.whl -t fashionbert-search .
# Run it where pip can reach an index (or a mirror), with the Python the image has (3.11 for the
# Debian bookworm base); for the GPU image pass the extra: deploy/wheelhouse.sh .whl gpu
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.whl}"
extra="${2:-}"
mkdir -p "$out"
# pip wheel downloads the wheels there are and builds the rest (sdists) into wheels, so the offline
# install never needs a build backend for a dependency; setuptools is for building the project itself.
extras="backbones${extra:+,$extra}"  # the image installs every patch network (Dockerfile)
python -m pip wheel --quiet --prefer-binary --wheel-dir "$out" -c requirements.lock ".[$extras]" "setuptools>=68" wheel
rm -f "$out"/fashionbert_search-*.whl  # the image builds the project from its source, not a stale wheel
echo "$(find "$out" -name '*.whl' | wc -l) wheels in $out ($(du -sh "$out" | cut -f1))"
