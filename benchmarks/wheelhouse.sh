#!/usr/bin/env bash
# Wheels for `python -m benchmarks.run` on an accelerator host that has jax, flax, optax and orbax-checkpoint
# but no package index (a GPU or TPU VM without internet): ml_collections, which our configs need, and the
# peer, diffusers 0.35.2, with everything they pull in (~35 MB for CPython 3.12 on x86-64). The suite needs
# nothing else: no grain, TFDS, TensorFlow, clu or torch (diffusers' Flax path imports without torch).
#
#   bash benchmarks/wheelhouse.sh wheels 3.12     # here, with an index: folder, the other host's Python
#   # there, in a copy of this repository with wheels/ beside it:
#   pip install --no-index --find-links wheels ml_collections diffusers==0.35.2
#   USE_TORCH=0 python -m benchmarks.run --config=small,medium,sd21 --out=results.json
set -euo pipefail
dest="${1:?usage: benchmarks/wheelhouse.sh DEST_DIR [PYTHON_VERSION, default 3.12]}"
python_version="${2:-3.12}"
pip download --quiet --only-binary=:all: --dest "$dest" --implementation cp --python-version "$python_version" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  ml_collections diffusers==0.35.2
echo "$(ls "$dest" | wc -l) wheels in $dest ($(du -sh "$dest" | cut -f1))"
