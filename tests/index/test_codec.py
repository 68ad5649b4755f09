"""The patch-feature codec against full precision on real EfficientNet patches."""

from __future__ import annotations

import numpy as np

from index.codec import decode, encode, relative_error, train_codec


def test_pq_codes_keep_most_of_the_real_patch_signal(hm_slice) -> None:
    _, features = hm_slice
    train, test = features[:48], features[48:]
    codec, factory = train_codec(train.reshape(-1, train.shape[-1]).astype(np.float32), "PQ64")
    assert factory == "PQ64" and codec.sa_code_size() == 64
    codes = encode(codec, test)
    assert codes.shape == (len(test), 64, 64) and codes.dtype == np.uint8
    decoded = decode(codec, codes)
    assert decoded.shape == test.shape and decoded.dtype == np.float32
    # Trained on 48 items only, so coarser than a real build's codec (~0.07), yet far from noise (1.0).
    assert relative_error(codec, test) < 0.3


def test_too_few_vectors_fall_back_to_a_scalar_quantizer() -> None:
    vectors = np.abs(np.random.default_rng(0).standard_normal((100, 64))).astype(np.float32)
    codec, factory = train_codec(vectors, "PQ16")
    assert factory == "SQ8" and codec.sa_code_size() == 64
    assert relative_error(codec, vectors[None]) < 0.01
