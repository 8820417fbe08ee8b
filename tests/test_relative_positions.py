"""Relative positions: log buckets and the index into the relative embedding table (DESIGN.md section 2).

References: the formula written out with Python's math module, hand-computed values, and transformers'
`make_log_bucket_position` / `build_relative_position` as an independent implementation. We follow transformers:
distances are not clamped to +-(max_position - 1) before bucketing; the final index is clamped to [0, 2 * span - 1],
so keys further than max_position - 1 away share the outermost table rows (which is also where clamping first
would have put them).
"""

import math

import pytest
import torch
from conftest import tiny_config
from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position, make_log_bucket_position

from modeling_deberta_custom.attention import log_bucket_positions, relative_position_index


def reference_bucket(delta: int, buckets: int, max_position: int) -> int:
    """The DESIGN.md formula: |delta| < mid stays linear, beyond it
    ceil(log(|delta| / mid) / log((max_position - 1) / mid) * (mid - 1)) + mid, with the sign of delta."""
    mid = buckets // 2
    if abs(delta) < mid:
        return delta
    bucket = math.ceil(math.log(abs(delta) / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return int(math.copysign(bucket, delta))


# Worked by hand for the DeBERTa-v3 setting (256 buckets, max_position 512, mid 128, log(511 / 128) = 1.38433):
#   129: ceil(log(129/128) / 1.38433 * 127) + 128 = ceil(0.714) + 128 = 129
#   300: ceil(log(300/128) / 1.38433 * 127) + 128 = ceil(78.15) + 128 = 207
#   511: log(511/128) / log(511/128) * 127 = 127 -> 255, the last bucket
#   512: ceil(127.23) + 128 = 256; 600: ceil(141.7) + 128 = 270; 5000: ceil(336.4) + 128 = 465
V3_BUCKETS = {0: 0, 1: 1, 127: 127, 128: 128, 129: 129, 300: 207, 511: 255, 512: 256, 600: 270, 5000: 465}


@pytest.mark.parametrize("delta", sorted(V3_BUCKETS))
def test_hand_computed_buckets_v3(delta):
    expected = V3_BUCKETS[delta]
    assert reference_bucket(delta, 256, 512) == expected
    deltas = torch.tensor([delta, -delta])
    assert log_bucket_positions(deltas, 256, 512).tolist() == [expected, -expected]


GEOMETRIES = [(256, 512), (256, 1024), (8, 64), (8, 24), (4, 16), (16, 128), (6, 10)]


@pytest.mark.parametrize(("buckets", "max_position"), GEOMETRIES)
def test_buckets_match_formula_and_transformers(buckets, max_position):
    """Every distance up to well past max_position, both signs."""
    deltas = torch.arange(-4 * max_position, 4 * max_position + 1)
    ours = log_bucket_positions(deltas, buckets, max_position)
    assert ours.dtype == deltas.dtype
    expected = torch.tensor([reference_bucket(int(d), buckets, max_position) for d in deltas])
    mismatch = deltas[ours != expected]
    assert mismatch.numel() == 0, f"differs from the formula at deltas {mismatch[:10].tolist()}"
    transformers_buckets = make_log_bucket_position(deltas, buckets, max_position).long()
    assert torch.equal(ours, transformers_buckets)


@pytest.mark.parametrize(("buckets", "max_position"), GEOMETRIES)
def test_bucket_properties(buckets, max_position):
    mid = buckets // 2
    deltas = torch.arange(0, 3 * max_position)
    positive = log_bucket_positions(deltas, buckets, max_position)
    # Antisymmetric: bucket(-d) = -bucket(d).
    assert torch.equal(log_bucket_positions(-deltas, buckets, max_position), -positive)
    # Linear up to mid, then non-decreasing.
    assert torch.equal(positive[: mid + 1], deltas[: mid + 1])
    assert bool((positive[1:] >= positive[:-1]).all())
    # max_position - 1 lands on the last bucket; beyond it buckets keep growing (no clamping of the distance).
    assert positive[max_position - 1].item() == buckets - 1
    assert positive[max_position].item() >= buckets
    far = log_bucket_positions(torch.tensor([100 * max_position]), buckets, max_position)
    assert far.item() > buckets


def transformers_indices(query_length, key_length, buckets, max_position, span):
    """(c2p index [Nq, Nk], p2c index [Nq, Nk]) as transformers' DisentangledSelfAttention computes them."""
    query, key = torch.empty(query_length, 1), torch.empty(key_length, 1)
    relative = build_relative_position(query, key, bucket_size=buckets, max_position=max_position)[0]  # [Nq, Nk]
    c2p = torch.clamp(relative + span, 0, 2 * span - 1)
    # p2c gathers row j (a key) at clamp(-r[j, i] + span) and transposes; r here is relative positions over keys.
    keys_relative = build_relative_position(key, key, bucket_size=buckets, max_position=max_position)[0]
    p2c_rows = torch.clamp(-keys_relative + span, 0, 2 * span - 1)  # [Nk, Nk], row = key j, column = query i
    return c2p, p2c_rows[:, :query_length].T


@pytest.mark.parametrize("length", [1, 7, 40, 100, 600])
@pytest.mark.parametrize(("buckets", "max_position"), [(256, 512), (8, 64)])
def test_index_matches_transformers(length, buckets, max_position):
    config = tiny_config(position_buckets=buckets, max_position_embeddings=max_position)
    index = relative_position_index(length, length, config, "cpu")
    assert index.shape == (length, length) and index.dtype == torch.long
    c2p, p2c = transformers_indices(length, length, buckets, max_position, config.relative_span)
    assert torch.equal(index, c2p)
    assert torch.equal(index, p2c)  # one index serves c2p and p2c


@pytest.mark.parametrize(("query_length", "key_length"), [(5, 9), (9, 5), (1, 30)])
def test_index_for_different_query_and_key_lengths(query_length, key_length):
    config = tiny_config(position_buckets=8, max_position_embeddings=64)
    index = relative_position_index(query_length, key_length, config, "cpu")
    c2p, _ = transformers_indices(query_length, key_length, 8, 64, config.relative_span)
    assert torch.equal(index, c2p)


def test_index_by_the_formula():
    """index[i, j] = clamp(bucket(i - j) + span, 0, 2 * span - 1), written out pair by pair."""
    config = tiny_config(position_buckets=8, max_relative_positions=24, max_position_embeddings=64)
    span, length = config.relative_span, 50
    assert span == 8 and config.max_relative_distance == 24
    index = relative_position_index(length, length, config, "cpu")
    for i in range(length):
        for j in range(length):
            expected = min(max(reference_bucket(i - j, 8, 24) + span, 0), 2 * span - 1)
            assert index[i, j].item() == expected, (i, j)


@pytest.mark.parametrize(("max_relative_positions", "span"), [(6, 6), (-1, 64)])
def test_unbucketed_index_is_clipped_distance(max_relative_positions, span):
    """Without buckets: index = clamp(i - j + span, 0, 2 * span - 1), span = max_relative_positions, or
    max_position_embeddings when that is -1."""
    config = tiny_config(position_buckets=-1, max_relative_positions=max_relative_positions)
    assert config.relative_span == span
    length = 150
    index = relative_position_index(length, length, config, "cpu")
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    assert torch.equal(index, (i - j + span).clamp(0, 2 * span - 1))
    c2p, p2c = transformers_indices(length, length, -1, -1, span)
    assert torch.equal(index, c2p) and torch.equal(index, p2c)


@pytest.mark.parametrize(("buckets", "max_position", "length"), [(256, 512, 1200), (8, 64, 200), (8, 24, 80)])
def test_far_keys_share_the_outermost_rows(buckets, max_position, length):
    """Past max_position (transformers' behaviour, which we follow): a key max_position - 1 or more tokens before
    the query reads the last row 2 * span - 1; a key max_position or more tokens after it reads row 0, which
    nothing else reads (one key max_position - 1 after reads row 1, like the nearer keys in the last bucket).
    Clamping the distance to +-(max_position - 1) before bucketing, as the original code does, would send those
    keys to row 1 instead; the index is the same everywhere else."""
    config = tiny_config(position_buckets=buckets, max_position_embeddings=max_position)
    span = config.relative_span
    index = relative_position_index(length, length, config, "cpu")
    distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # i - j
    assert bool((index[distance >= max_position - 1] == 2 * span - 1).all())
    beyond_after = distance <= -max_position
    assert beyond_after.any()
    assert bool((index[beyond_after] == 0).all())
    assert bool((index[~beyond_after] > 0).all())
    assert bool((index[distance == -(max_position - 1)] == 1).all())
    clamped_first = log_bucket_positions(distance.clamp(-(max_position - 1), max_position - 1), buckets, max_position)
    original = (clamped_first + span).clamp(0, 2 * span - 1)
    assert torch.equal(index[~beyond_after], original[~beyond_after])
    assert bool((original[beyond_after] == 1).all())


@pytest.mark.parametrize("length", [12, 40])
def test_index_is_fixed_for_a_given_length(length):
    """A shorter sequence's index is the top-left corner of a longer one's (positions are relative)."""
    config = tiny_config()
    longer = relative_position_index(length + 17, length + 17, config, "cpu")
    assert torch.equal(relative_position_index(length, length, config, "cpu"), longer[:length, :length])
