"""PyTorch DeBERTa (v1, v2, v3) for Hugging Face Transformers.

Read top to bottom: relative positions -> disentangled attention -> layer -> encoder -> base model -> heads
(Enhanced Mask Decoder masked-LM, sequence / token classification, question answering, multiple choice,
replaced-token detection).

Notation in shape comments: B batch, N sequence length, H heads, D head size, C hidden size, S relative span
(the relative embedding table has 2S rows), V vocabulary.

This file is copied next to the weights by `save_pretrained` for `trust_remote_code` loading, so it imports only
torch, transformers and its sibling files.
"""

import functools
import inspect
import math
import os
import shutil
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import ModelOutput

from .configuration_deberta_custom import DebertaCustomConfig
from .convert import (
    CHECKPOINT_KEY_MAPPING,
    IGNORED_CHECKPOINT_KEYS,
    RTD_PRETRAINING_ONLY_KEYS,
    RTD_SHARED_TABLE_MAPPING,
    check_device_map,
    checkpoint_config_dict,
    describe_weight_source,
    is_required_weight,
    merge_embedding_deltas,
    rtd_shared_tables,
    unreadable_weight_file,
)

try:  # transformers >= 5: these initialisers skip tensors that were loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x initialises before loading, so plain torch initialisers are right
    from torch.nn import init


# Every Auto class this file serves, as written into a saved config's `auto_map` ("file.ClassName").
AUTO_MAP = {
    "AutoConfig": "configuration_deberta_custom.DebertaCustomConfig",
    "AutoModel": "modeling_deberta_custom.DebertaCustomModel",
    "AutoModelForMaskedLM": "modeling_deberta_custom.DebertaCustomForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_deberta_custom.DebertaCustomForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_deberta_custom.DebertaCustomForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_deberta_custom.DebertaCustomForQuestionAnswering",
    "AutoModelForMultipleChoice": "modeling_deberta_custom.DebertaCustomForMultipleChoice",
}


# ----------------------------------------------------------------------------------------------------------------------
# Relative positions
# ----------------------------------------------------------------------------------------------------------------------


def log_bucket_positions(delta: torch.Tensor, num_buckets: int, max_position: int) -> torch.Tensor:
    """Map signed distances to log buckets: |delta| below num_buckets // 2 stays as it is, larger distances grow
    logarithmically so that |delta| = max_position - 1 lands on the last bucket. Distances beyond max_position are
    not clamped first (transformers' behaviour); the caller clamps the final table index instead."""
    mid = num_buckets // 2
    abs_delta = delta.abs()
    # Float32 throughout, as the reference implementations compute it: the ceil below sits on bucket edges.
    log_ratio = torch.log(abs_delta.clamp(min=mid).float() / mid)
    # A Python number (the kernel rounds it to float32), not a tensor: no host-to-device copy in every forward.
    log_span = math.log((max_position - 1) / mid)
    log_bucket = torch.ceil(log_ratio / log_span * (mid - 1)) + mid
    return torch.where(abs_delta <= mid, delta, (torch.sign(delta) * log_bucket).to(delta.dtype))


class FarDistances(NamedTuple):
    """Every distance d <= low reads table row low_row, every d >= high reads high_row: the outermost buckets, and
    distances past the table, which clamp to its last rows."""

    low: int
    low_row: int
    high: int
    high_row: int


class RelativePositions(NamedTuple):
    """Relative positions of a query sequence against a key sequence, prepared once per forward for every layer.

    Scores depend on query i and key j only through the distance d = i - j, so positions are kept per distance:
    `rows[d + Nk - 1]` is the row of the relative embedding table that distance d reads, for d from -(Nk - 1) up to
    Nq - 1 ([Nq + Nk - 1]). Only rows [first_row, first_row + num_rows) of the table are ever read, and `rows` counts
    from first_row: the attention layers project only that slice. `one_row_per_distance` is True when
    rows == arange(num_rows) (no bucket merges two distances, none is clamped: sequences up to position_buckets / 2):
    the projected slice is then already laid out by distance. Otherwise `index` [Nq, Nk] holds the row of every
    pair (rows[i - j + Nk - 1]) for the gathers, and `flat_index` [Nq, Nk] = index * Nk + j the place of pair
    (i, j) in [R, Nk] products flattened (the fast path's p2c gather). `far` (FarDistances, when known) marks the
    distances at both ends that share one row, so that pairs that far apart need no gather."""

    rows: torch.Tensor
    first_row: int
    num_rows: int
    one_row_per_distance: bool
    index: torch.Tensor | None = None
    flat_index: torch.Tensor | None = None
    far: FarDistances | None = None


def relative_distance_rows(query_length: int, key_length: int, config: DebertaCustomConfig, device) -> torch.Tensor:
    """[Nq + Nk - 1] row of the 2S-row relative embedding table for each distance d = i - j, from d = -(Nk - 1) up to
    Nq - 1: the (bucketed) distance shifted by S and clamped to the table. c2p and p2c both read these rows."""
    span = config.relative_span
    distances = torch.arange(-(key_length - 1), query_length, device=device)  # [Nq + Nk - 1]
    if config.position_buckets > 0:
        distances = log_bucket_positions(distances, config.position_buckets, config.max_relative_distance)
    return (distances + span).clamp(0, 2 * span - 1)


def pair_index(rows: torch.Tensor, query_length: int, key_length: int) -> torch.Tensor:
    """Per-distance values [Nq + Nk - 1] -> per-pair [Nq, Nk]: entry (i, j) is rows[i - j + Nk - 1]."""
    query_ids = torch.arange(query_length, device=rows.device)[:, None]
    key_ids = torch.arange(key_length, device=rows.device)[None, :]
    return rows[query_ids - key_ids + key_length - 1]


def relative_position_index(query_length: int, key_length: int, config: DebertaCustomConfig, device) -> torch.Tensor:
    """[Nq, Nk] index of each (query i, key j) pair into the 2S-row relative embedding table."""
    rows = relative_distance_rows(query_length, key_length, config, device)
    return pair_index(rows, query_length, key_length)


def _exporting() -> bool:
    """True while torch.export or the TorchScript ONNX exporter traces the model: the graph must serve every length,
    so the length-dependent shortcuts (_one_row_per_distance, uses_distance_layout) are not taken; the general path
    gives the same values at every length. (torch < 2.7 has no is_exporting: is_compiling covers export there.)"""
    return torch.jit.is_tracing() or getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)()


def _one_row_per_distance(query_length: int, key_length: int, config: DebertaCustomConfig) -> bool:
    """True when every distance reads a row of its own: |d| up to position_buckets // 2 stays as it is in the log
    buckets, and up to S - 1 nothing is clamped. Decided on Python ints, so it costs no host sync."""
    if _exporting():
        return False
    longest = max(query_length, key_length) - 1
    limit = config.position_buckets // 2 if config.position_buckets > 0 else config.relative_span - 1
    return longest <= limit


# The fast path lays the position products out by distance (N x (Nq + Nk - 1) products, then strided views, no
# gather) or by table row (N x R products, then one gather per term). Measured on CPU (scripts/benchmark.py): when
# every distance has a row of its own the two cost the same products and the distance layout saves the gathers;
# otherwise gathering is faster for inference, but torch.gather keeps its [N, R] input for backward, so training
# stays with the distance layout while there are at most this many distances per table row (sequences up to about
# 1000 tokens with 256 buckets), which keeps no tensor larger than the projections for backward.
DISTANCE_LAYOUT_MAX_RATIO_TRAINING = 2


def uses_distance_layout(relative: RelativePositions, query_length: int, key_length: int, for_backward: bool) -> bool:
    if _exporting():
        return False
    if relative.one_row_per_distance:
        return True
    return for_backward and query_length + key_length - 1 <= DISTANCE_LAYOUT_MAX_RATIO_TRAINING * relative.num_rows


def relative_positions(query_length: int, key_length: int, config: DebertaCustomConfig, device) -> RelativePositions:
    """Everything the attention layers need about relative positions (see RelativePositions); computed once per
    forward from the lengths, so that no layer repeats it."""
    if _one_row_per_distance(query_length, key_length, config):
        first_row = config.relative_span - (key_length - 1)  # the row of d = -(Nk - 1)
        num_rows = query_length + key_length - 1
        return RelativePositions(torch.arange(num_rows, device=device), first_row, num_rows, True)
    rows = relative_distance_rows(query_length, key_length, config, device)
    index = pair_index(rows, query_length, key_length)
    flat_index = index * key_length + torch.arange(key_length, device=device)
    far = None
    if not (_exporting() or torch.compiler.is_compiling()):  # read on the host: no device sync, no graph break
        host_rows = rows if rows.device.type == "cpu" else relative_distance_rows(query_length, key_length, config, "cpu")
        # rows grow with the distance: count the runs of equal rows at both ends
        low = int((host_rows == host_rows[0]).sum()) - 1 - (key_length - 1)
        high = query_length - 1 - (int((host_rows == host_rows[-1]).sum()) - 1)
        far = FarDistances(low, int(host_rows[0]), high, int(host_rows[-1]))
    return RelativePositions(rows, 0, 2 * config.relative_span, False, index, flat_index, far)


# ----------------------------------------------------------------------------------------------------------------------
# Disentangled attention
# ----------------------------------------------------------------------------------------------------------------------


def eager_attention(query, key, value, pos_key, pos_query, relative, key_mask, scale, dropout, training):
    """Reference path, the scores as the paper writes them. query [B, H, Nq, D]; key, value [B, H, Nk, D]; pos_key
    (c2p) and pos_query (p2c) [H, R, D] or None: the projected rows of the relative table that `relative` reads;
    key_mask [B, 1, 1, Nk] (True = attend). Each term is scaled before the sum, which keeps half precision in range.
    Returns the context [B, H, Nq, D] and the probabilities [B, H, Nq, Nk]."""
    batch, heads, query_length, key_length = *query.shape[:3], key.shape[-2]
    query = query * scale
    scores = torch.matmul(query, key.transpose(-1, -2))  # c2c [B, H, Nq, Nk]
    if pos_key is not None or pos_query is not None:
        index = pair_index(relative.rows, query_length, key_length)  # [Nq, Nk]: the table row of each pair
    if pos_key is not None:  # c2p[i, j] = Q_i . K_r[index[i, j]]
        c2p_table = torch.matmul(query, pos_key.transpose(-1, -2))  # [B, H, Nq, R]
        scores = scores + torch.gather(c2p_table, -1, index.expand(batch, heads, query_length, key_length))
    if pos_query is not None:  # p2c[i, j] = K_j . Q_r[index[i, j]]: gathered along the keys' rows, then transposed
        p2c_table = torch.matmul(key * scale, pos_query.transpose(-1, -2))  # [B, H, Nk, R]
        index_t = index.transpose(0, 1).expand(batch, heads, key_length, query_length)
        scores = scores + torch.gather(p2c_table, -1, index_t).transpose(-1, -2)
    scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value), probs


def _diagonals(by_distance: torch.Tensor, columns: int) -> torch.Tensor:
    """[..., M, L] -> [..., M, K] view (K = columns <= L - M + 1) with out[m, k] = by_distance[m, k - m + M - 1]:
    each row of the result starts one column further left in the source, so a table over (row, distance) becomes a
    matrix over (row, column) pairs. No copy: flattened, the wanted entries sit at m * (L - 1) + k + M - 1, so
    dropping the first M - 1 values and re-reading rows of L - 1 lines them up."""
    rows, length = by_distance.shape[-2:]
    if rows == 1:  # a single row reads itself (the slicing below needs L - 1 >= K, i.e. M >= 2)
        return by_distance[..., :columns]
    flat = by_distance.contiguous().flatten(-2)  # [..., M * L]
    return flat[..., rows - 1:rows - 1 + rows * (length - 1)].unflatten(-1, (rows, length - 1))[..., :columns]


def key_bias_of(key_mask, dtype):
    """[B, 1, 1, Nk] bool -> [B, Nk]: 0 for keys to attend, half the dtype's minimum for masked ones (it stays
    finite in half precision once the position terms are added)."""
    batch, key_length = key_mask.shape[0], key_mask.shape[-1]
    key_bias = torch.zeros(batch, key_length, dtype=dtype, device=key_mask.device)
    return key_bias.masked_fill(~key_mask.reshape(batch, key_length), torch.finfo(dtype).min / 2)


def _table_operand(table, scale):
    """[H, W, D] -> scaled [H, D, W'] contiguous, W' = W rounded up to a multiple of 16 with zero columns."""
    operand = (table.transpose(-1, -2) * scale).contiguous()
    width = operand.shape[-1]
    return operand if width % 16 == 0 else F.pad(operand, (0, 16 - width % 16))


def position_tables(pos_key, pos_query, relative, by_distance, c2p_scale, p2c_scale):
    """The projected relative rows as matrix-product operands, scaled (c2p's by c2p_scale, p2c's by p2c_scale):
    (c2p table [H, D, W], p2c table), each None when its term is off. By distance the W columns are the table rows of
    the distances (c2p: d = Nq - 1 down to -(Nk - 1); p2c: d = -(Nk - 1) up to Nq - 1) and the p2c table is
    [H, D, W] too; by table row W = R and the p2c table is [H, R, D]. Operands are contiguous and padded to a multiple
    of 16 columns (CPU GEMMs take twice as long on an odd width; the extra columns are never read)."""
    key_table = query_table = None
    if pos_key is not None:
        if by_distance:
            pos_key = pos_key.flip(-2) if relative.one_row_per_distance else pos_key[:, relative.rows.flip(0)]
        key_table = _table_operand(pos_key, c2p_scale)
    if pos_query is not None:
        if by_distance:
            pos_query = pos_query if relative.one_row_per_distance else pos_query[:, relative.rows]
            query_table = _table_operand(pos_query, p2c_scale)
        else:
            query_table = pos_query * p2c_scale
    return key_table, query_table


def position_products(query, key, tables, key_bias, by_distance):
    """The fast path's position products, heads-major, each None when its term is off:

    - by distance: c2p [H, B, Nq, W] (row i, column c <-> d = Nq - 1 - c) and p2c [H, B, Nk, W] (row j, column
      c <-> d = c - (Nk - 1));
    - by table row: c2p [H, B, Nq, R] = Q_c K_r^T and p2c [H, B, R, Nk] = Q_r K_c^T (keys last, so that the gather
      of position_bias lands p2c in the same [query, key] layout as c2p).

    The key bias [B, Nk] is added along p2c's keys, so that masking costs no pass over [Nq, Nk]. The products run
    heads-major ([H, B * N, D] views of the [B, N, H * D] projections, no copy), so each head is one plain matrix
    product with its table and no table is copied per batch entry."""
    key_table, query_table = tables
    batch, heads, query_length, key_length = *query.shape[:3], key.shape[-2]
    c2p = p2c = None
    if key_table is not None:
        query = query.transpose(0, 1).flatten(1, 2)  # [H, B * Nq, D]
        c2p = torch.bmm(query, key_table).view(heads, batch, query_length, key_table.shape[-1])
    if query_table is not None:
        if by_distance:
            key = key.transpose(0, 1).flatten(1, 2)  # [H, B * Nk, D]
            p2c = torch.bmm(key, query_table).view(heads, batch, key_length, query_table.shape[-1])
            p2c = p2c.add_(key_bias[:, :, None])  # in place: the product's backward does not need its result
        else:
            p2c = torch.matmul(query_table[:, None], key.transpose(0, 1).transpose(-1, -2))  # [H, B, R, Nk]
            p2c = p2c.add_(key_bias[:, None, :])
    return c2p, p2c


def _gathered_keys(far, start, stop, key_length):
    """The keys [first, stop) that some query in rows [start, stop) reaches through a row of its own: keys before
    `first` are at distance >= far.high from every one of those queries, keys from `stop` on at <= far.low."""
    if far is None:
        return 0, key_length
    first = min(max(start - far.high + 1, 0), key_length)
    return first, min(max(stop - 1 - far.low, first), key_length)


def _far_scores(c2p, p2c, key_bias, row, start, stop, keys):
    """c2p + p2c (with the key bias) of query rows [start, stop) against `keys`, where every pair reads table row
    `row`: c2p is then constant along the keys and p2c along the queries. [H, B, rows, len(keys)]."""
    scores = p2c[:, :, row, None, keys] if p2c is not None else key_bias[:, None, keys]  # [H, B, 1, K] or [B, 1, K]
    if c2p is not None:
        scores = c2p[:, :, start:stop, row, None] + scores
    heads, batch = (c2p if c2p is not None else p2c).shape[:2]
    return scores.expand(heads, batch, stop - start, scores.shape[-1])


def position_bias(c2p, p2c, key_bias, relative, by_distance, query_length, start, stop):
    """Query rows [start, stop) of c2p + p2c with masked keys at a large negative value: the additive mask
    [B, H, stop - start, Nk] that SDPA reads (a view of a heads-major tensor, which it takes as it is).

    By distance, c2p[i, j] sits at column j - i + Nq - 1 of row i, so c2p is a strided view of the products
    (_diagonals, no gather), and p2c likewise along the keys; one add writes the result. By table row, c2p gathers
    along the rows of its products, and p2c from its products flattened (p2c[i, j] = p2c_products[index[i, j], j]
    at flat_index[i, j]), so that both come out in [query, key] order and the add reads them in order (reading p2c
    transposed would cost as much as both gathers together); keys that every query of the block sees from beyond
    the table's reach (relative.far) take one row of each term, broadcast, instead of a gather."""
    key_length = key_bias.shape[-1]
    if by_distance:
        if c2p is not None:
            c2p = _diagonals(c2p, key_length)[:, :, start:stop]  # [H, B, rows, Nk]
        if p2c is not None:
            p2c = _diagonals(p2c, query_length)[..., start:stop].transpose(-1, -2)  # [H, B, rows, Nk]
        if c2p is not None and p2c is not None:
            return (c2p + p2c).transpose(0, 1)  # [H, B, rows, Nk] -> [B, H, rows, Nk]
    else:
        first_key, stop_key = _gathered_keys(relative.far, start, stop, key_length)
        band = slice(first_key, stop_key)
        heads, batch = (c2p if c2p is not None else p2c).shape[:2]
        rows, width = stop - start, stop_key - first_key
        gathered = key_bias[:, None, band]  # [B, 1, width]: the mask alone while p2c (which carries it) is off
        if p2c is not None:
            index = relative.flat_index[start:stop, band].reshape(1, 1, rows * width).expand(heads, batch, -1)
            gathered = torch.gather(p2c.flatten(-2), -1, index).view(heads, batch, rows, width)
        if c2p is not None:
            index = relative.index[start:stop, band].expand(heads, batch, rows, width)
            # in place: the gather's backward does not need its result
            gathered = torch.gather(c2p[:, :, start:stop], -1, index).add_(gathered)
        if width == key_length:
            return gathered.transpose(0, 1)
        # Keys left of the band are so far behind every query of the block that they all read far.high_row, keys
        # right of it all read far.low_row: one row of each term, broadcast.
        left = _far_scores(c2p, p2c, key_bias, relative.far.high_row, start, stop, slice(0, first_key))
        right = _far_scores(c2p, p2c, key_bias, relative.far.low_row, start, stop, slice(stop_key, None))
        return torch.cat([left, gathered, right], dim=-1).transpose(0, 1)
    if c2p is None:
        return p2c.contiguous().transpose(0, 1)
    return (c2p + key_bias[:, None, :]).transpose(0, 1)


def disentangled_bias(query, key, pos_key, pos_query, relative, key_mask, scale):
    """c2p + p2c for every pair, scaled, masked keys at a large negative value: [B, H, Nq, Nk]. The same values as
    eager_attention's position terms, built without [Nq, Nk] intermediates (position_products, position_bias)."""
    query_length = query.shape[-2]
    by_distance = uses_distance_layout(relative, query_length, key.shape[-2], _needs_backward(query, key, pos_key,
                                                                                              pos_query))
    key_bias = key_bias_of(key_mask, query.dtype)
    tables = position_tables(pos_key, pos_query, relative, by_distance, scale, scale)
    c2p, p2c = position_products(query, key, tables, key_bias, by_distance)
    return position_bias(c2p, p2c, key_bias, relative, by_distance, query_length, 0, query_length)


def _needs_backward(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# The fast path works through heads in groups (and, for inference, through the query rows of long sequences in
# blocks) so that the position products and the additive mask of one tile stay near this many elements (128 MiB in
# fp32): transient memory then grows with N x N only per tile. Up to 512 tokens (and batch 2) a layer is one tile:
# every tile costs a dozen kernel launches, and on a machine whose cores are shared each parallel region waits for
# its slowest thread (measured on the 2-core benchmark VM: 2-3x slower with 16 MiB tiles). Smaller tiles can win on
# an idle machine, where they stay in cache and the allocator recycles their memory instead of mapping fresh pages
# (~1 ms per MiB of page faults on that VM).
TILE_ELEMENTS = 1 << 25
MIN_BLOCK_ROWS = 256  # SDPA slows down on shorter query blocks


def _attention_tiles(batch, heads, query_length, key_length, width, for_backward, far=None):
    """(heads per group, query rows per block) for the fast path: groups of equal size whose products
    ([Nq + Nk, W] per head) and additive mask ([rows, Nk] per head) stay within TILE_ELEMENTS. For inference with
    keys beyond the table's reach (`far`, gathered layout), blocks of MIN_BLOCK_ROWS rows: each then gathers only the
    keys within its reach (_gathered_keys) and broadcasts the rest. One tile while compiling or tracing, where the
    compiler plans memory itself."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return heads, query_length
    products = batch * (query_length + key_length) * width  # per head
    mask = batch * query_length * key_length  # per head, all rows
    groups = -(-heads * (products + mask) // TILE_ELEMENTS)  # ceil
    heads_per_group = -(-heads // min(max(groups, 1), heads))
    rows_per_block = query_length
    if heads_per_group == 1 and products + mask > TILE_ELEMENTS and not for_backward:
        rows_per_block = max(MIN_BLOCK_ROWS, (TILE_ELEMENTS - products) // (batch * key_length))
    if not for_backward and far is not None and MIN_BLOCK_ROWS + far.high - far.low - 2 < key_length:
        rows_per_block = min(rows_per_block, MIN_BLOCK_ROWS)  # a block's gathered keys: rows + high - low - 2
    return heads_per_group, rows_per_block


def _cpu_training_attention(query, key, value, pos_key, pos_query, relative, key_bias, scale, dropout, by_distance):
    """Training on CPU. There SDPA computes a mask that needs a gradient (or dropout) with its math fallback, which
    keeps contiguous copies of the scaled query and key for backward and takes the mask as a separate tensor. The
    same math written out here runs one head at a time: the scores, the position products and the context of a head
    are plain matrix products of [B, N, D] slices of the projections (no copies kept for backward), the position
    terms are added into the scores in place, and each head's tensors stay small enough for the allocator to
    recycle (see TILE_ELEMENTS), backward included. Returns [B, H, Nq, D] (a view of [B, Nq, H, D])."""
    query_length = query.shape[-2]
    tables = position_tables(pos_key, pos_query, relative, by_distance, 1.0, scale)  # the query is scaled below
    # unbind rather than index per head: its backward stacks the heads' gradients once, where indexing would fill a
    # zero tensor of the whole projection for every head and add them up.
    queries, keys, values = (query * scale).unbind(1), key.unbind(1), value.unbind(1)  # H x [B, N, D]
    tables = [None if table is None else table.unbind(0) for table in tables]  # H x table of one head
    # Dropout draws its noise for all heads at once, in [B, H, Nq, Nk] order and scaled as torch's CPU dropout does
    # it inside SDPA: under reentrant gradient checkpointing the forward runs without grad (through SDPA) and the
    # recomputation for backward runs here, and both must drop the same probabilities.
    keep = None
    if dropout > 0:
        keep = torch.empty(*query.shape[:3], key.shape[-2], dtype=query.dtype, device=query.device)
        keep = keep.bernoulli_(1 - dropout).div_(1 - dropout)
    contexts = []
    for head in range(len(queries)):
        head_tables = tuple(None if table is None else table[head][None] for table in tables)
        c2p, p2c = position_products(queries[head][:, None], keys[head][:, None], head_tables, key_bias, by_distance)
        bias = position_bias(c2p, p2c, key_bias, relative, by_distance, query_length, 0, query_length)[:, 0]
        scores = torch.matmul(queries[head], keys[head].transpose(-1, -2))  # [B, Nq, Nk]
        scores = scores.add_(bias)  # in place: the product's backward does not need its result
        probs = torch.softmax(scores, dim=-1)
        if keep is not None:
            probs = probs * keep[:, head]
        contexts.append(torch.matmul(probs, values[head]))  # [B, Nq, D]
    return torch.stack(contexts, dim=2).transpose(1, 2)


def sdpa_attention(query, key, value, pos_key, pos_query, relative, key_mask, scale, dropout, training):
    """Fast path: torch's fused scaled_dot_product_attention with the position terms as its additive mask, built
    from the position products (position_products, position_bias) one tile of heads and query rows at a time (see
    TILE_ELEMENTS). Does not return probabilities."""
    dropout = dropout if training else 0.0
    if pos_key is None and pos_query is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=dropout,
                                              scale=scale), None
    batch, heads, query_length, key_length = *query.shape[:3], key.shape[-2]
    for_backward = _needs_backward(query, key, pos_key, pos_query)
    by_distance = uses_distance_layout(relative, query_length, key_length, for_backward)
    width = query_length + key_length - 1 if by_distance else relative.num_rows
    far = None if by_distance else relative.far  # only gathers skip far keys
    heads_per_group, rows_per_block = _attention_tiles(batch, heads, query_length, key_length, width, for_backward,
                                                       far)
    key_bias = key_bias_of(key_mask, query.dtype)
    if for_backward and query.device.type == "cpu" and not torch.compiler.is_compiling():
        return _cpu_training_attention(query, key, value, pos_key, pos_query, relative, key_bias, scale,
                                       dropout, by_distance), None
    tables = position_tables(pos_key, pos_query, relative, by_distance, scale, scale)
    if heads_per_group == heads and rows_per_block >= query_length:  # a single tile
        c2p, p2c = position_products(query, key, tables, key_bias, by_distance)
        bias = position_bias(c2p, p2c, key_bias, relative, by_distance, query_length, 0, query_length)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scale), None
    groups = []
    for first in range(0, heads, heads_per_group):
        group = slice(first, first + heads_per_group)
        group_tables = tuple(None if table is None else table[group] for table in tables)
        c2p, p2c = position_products(query[:, group], key[:, group], group_tables, key_bias, by_distance)
        blocks = []
        for start in range(0, query_length, rows_per_block):
            stop = min(start + rows_per_block, query_length)
            bias = position_bias(c2p, p2c, key_bias, relative, by_distance, query_length, start, stop)
            context = F.scaled_dot_product_attention(query[:, group, start:stop], key[:, group], value[:, group],
                                                     attn_mask=bias, dropout_p=dropout, scale=scale)
            blocks.append(context.transpose(1, 2))  # [B, rows, heads in group, D]
        groups.append(torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0])
    # Concatenated as [B, Nq, H, D], so that the caller's transpose back to [B, N, H * D] is a view, not a copy.
    return torch.cat(groups, dim=2).transpose(1, 2), None


def _flex_attention_uncompiled():
    from torch.nn.attention.flex_attention import flex_attention  # torch >= 2.5; imported only by this path

    return flex_attention


@functools.cache
def _compiled_flex_attention():
    """torch's flex_attention compiled once for the process (FlexAttention runs unfused, materialising every score,
    unless compiled). Shapes stay static: inductor's CPU kernel for dynamic shapes fails to build in torch 2.13, so
    each new sequence length compiles anew (a few seconds)."""
    return torch.compile(_flex_attention_uncompiled(), dynamic=False)


def flex_attention_path(query, key, value, pos_key, pos_query, relative, key_mask, scale, dropout, training):
    """Fused path: torch's FlexAttention, which computes the content scores block by block and adds the position
    terms inside the kernel (score_mod), reading them from the compact products of position_products by table row:
    c2p [H, B, Nq, R] and p2c [H, B, R, Nk]. No [Nq, Nk] tensor is built, so attention memory grows linearly with N,
    forward and backward (FlexAttention's backward recomputes the scores and returns the products' gradients).
    FlexAttention has no attention dropout, and torch has no FlexAttention backward on CPU: training needs
    attention_probs_dropout_prob=0 and a GPU. Compiled on first use per shape; inside torch.compile it joins the
    caller's graph. Does not return probabilities."""
    if training and dropout > 0:
        raise ValueError(
            f"attn_implementation='flex_attention' has no attention dropout, but attention_probs_dropout_prob is "
            f"{dropout}: set it to 0.0 in the config to train with this path, or use 'sdpa' (inference in eval() "
            "mode is unaffected)"
        )
    if query.device.type == "cpu" and _needs_backward(query, key, value, pos_key, pos_query):
        raise NotImplementedError(
            "attn_implementation='flex_attention' cannot train on CPU: torch has no FlexAttention backward there. "
            "Use 'sdpa' (the default) for CPU training, or run under torch.no_grad()/inference_mode()"
        )
    key_bias = key_bias_of(key_mask, query.dtype)  # [B, Nk]
    tables = position_tables(pos_key, pos_query, relative, False, scale, scale)
    c2p, p2c = position_products(query, key, tables, key_bias, by_distance=False)  # p2c includes the key bias
    offset = key.shape[-2] - 1  # relative.rows[i - j + offset]: the table row of the pair (i, j)

    def add_position_scores(score, batch, head, i, j):  # score = q_i . k_j * scale, for one pair
        if c2p is None and p2c is None:  # relative attention off
            return score + key_bias[batch, j]
        row = relative.rows[i - j + offset]
        if c2p is not None:
            score = score + c2p[head, batch, i, row]
        return score + (p2c[head, batch, row, j] if p2c is not None else key_bias[batch, j])

    # Inside torch.compile the caller's graph takes FlexAttention in; outside, it runs compiled on its own.
    flex_attention = _flex_attention_uncompiled() if torch.compiler.is_compiling() else _compiled_flex_attention()
    return flex_attention(query, key, value, score_mod=add_position_scores, scale=scale), None


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention, "flex_attention": flex_attention_path}


class DebertaCustomSelfAttention(nn.Module):
    """Scores = (Q_c K_c^T + c2p + p2c) / sqrt(D * (1 + number of position terms)), where
    c2p[i, j] = Q_c[i] . K_r[idx(i, j)] and p2c[i, j] = K_c[j] . Q_r[idx(i, j)] (idx from relative_position_index)."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        inner_size = self.num_heads * self.head_size
        self.fused_projection = config.attention_variant == "v1"
        self.pos_att_type = config.pos_att_type if config.relative_attention else []
        # As in the reference implementations, the scale counts the configured position terms.
        self.scale = 1.0 / math.sqrt(self.head_size * (1 + len(config.pos_att_type)))

        if self.fused_projection:  # v1: one matrix, rows interleaved per head as [q_h, k_h, v_h]
            self.in_proj = nn.Linear(config.hidden_size, 3 * inner_size, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(inner_size))
            self.v_bias = nn.Parameter(torch.zeros(inner_size))
        else:
            self.query_proj = nn.Linear(config.hidden_size, inner_size)
            self.key_proj = nn.Linear(config.hidden_size, inner_size)
            self.value_proj = nn.Linear(config.hidden_size, inner_size)

        if self.pos_att_type:
            self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
            if self.fused_projection:
                if "c2p" in self.pos_att_type:
                    self.pos_proj = nn.Linear(config.hidden_size, inner_size, bias=False)
                if "p2c" in self.pos_att_type:
                    self.pos_q_proj = nn.Linear(config.hidden_size, inner_size)
            elif not config.share_att_key:
                if "c2p" in self.pos_att_type:
                    self.pos_key_proj = nn.Linear(config.hidden_size, inner_size)
                if "p2c" in self.pos_att_type:
                    self.pos_query_proj = nn.Linear(config.hidden_size, inner_size)
        self.attention_dropout = config.attention_probs_dropout_prob

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_size).transpose(-2, -3)  # [..., N, C] -> [..., H, N, D]

    def project_content(self, hidden_states, query_states):
        """Query from query_states (EMD passes a different one), key and value from hidden_states; each [B, H, N, D]."""
        if not self.fused_projection:
            return (
                self.split_heads(self.query_proj(query_states)),
                self.split_heads(self.key_proj(hidden_states)),
                self.split_heads(self.value_proj(hidden_states)),
            )
        # [3 * H * D, C] -> [H, 3, D, C]: the fused rows hold q, k, v per head
        weight = self.in_proj.weight.view(self.num_heads, 3, self.head_size, -1)
        query_weight, key_weight, value_weight = (weight[:, i].reshape(-1, weight.shape[-1]) for i in range(3))
        return (
            self.split_heads(F.linear(query_states, query_weight, self.q_bias)),
            self.split_heads(F.linear(hidden_states, key_weight)),
            self.split_heads(F.linear(hidden_states, value_weight, self.v_bias)),
        )

    def project_positions(self, rel_embeddings, relative: RelativePositions):
        """The rows of the relative embeddings [2S, C] that `relative` reads -> (position keys for c2p, position
        queries for p2c), each [H, R, D] or None."""
        rel_embeddings = self.pos_dropout(rel_embeddings[relative.first_row:relative.first_row + relative.num_rows])
        pos_key = pos_query = None
        if self.fused_projection:
            key_proj, query_proj = getattr(self, "pos_proj", None), getattr(self, "pos_q_proj", None)
        elif self.config.share_att_key:
            key_proj, query_proj = self.key_proj, self.query_proj
        else:
            key_proj, query_proj = getattr(self, "pos_key_proj", None), getattr(self, "pos_query_proj", None)
        if "c2p" in self.pos_att_type:
            pos_key = self.split_heads(key_proj(rel_embeddings))
        if "p2c" in self.pos_att_type:
            pos_query = self.split_heads(query_proj(rel_embeddings))
        return pos_key, pos_query

    def forward(self, hidden_states, key_mask, relative=None, rel_embeddings=None, query_states=None,
                output_attentions=False):
        if query_states is None:
            query_states = hidden_states
        query, key, value = self.project_content(hidden_states, query_states)
        pos_key = pos_query = None
        if self.pos_att_type:
            pos_key, pos_query = self.project_positions(rel_embeddings, relative)

        implementation = self.config._attn_implementation
        if output_attentions or implementation not in ATTENTION_FUNCTIONS:
            implementation = "eager"
        context, probs = ATTENTION_FUNCTIONS[implementation](
            query, key, value, pos_key, pos_query, relative, key_mask, self.scale, self.attention_dropout,
            self.training
        )
        context = context.transpose(1, 2).flatten(2)  # [B, H, N, D] -> [B, N, C]
        return context, probs


class DebertaCustomResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): closes both the attention and the feed-forward block."""

    def __init__(self, config: DebertaCustomConfig, input_size: int):
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class DebertaCustomAttention(nn.Module):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.self = DebertaCustomSelfAttention(config)
        self.output = DebertaCustomResidualOutput(config, config.hidden_size)

    def forward(self, hidden_states, key_mask, relative=None, rel_embeddings=None, query_states=None,
                output_attentions=False):
        context, probs = self.self(hidden_states, key_mask, relative, rel_embeddings, query_states, output_attentions)
        # The residual is the query: in EMD passes it is the decoder's query, not the keys.
        residual = hidden_states if query_states is None else query_states
        return self.output(context, residual), probs


class DebertaCustomIntermediate(nn.Module):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states))


class DebertaCustomLayer(GradientCheckpointingLayer):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.attention = DebertaCustomAttention(config)
        self.intermediate = DebertaCustomIntermediate(config)
        self.output = DebertaCustomResidualOutput(config, config.intermediate_size)

    def forward(self, hidden_states, key_mask, relative=None, rel_embeddings=None, query_states=None,
                output_attentions=False):
        attention_output, probs = self.attention(
            hidden_states, key_mask, relative, rel_embeddings, query_states, output_attentions
        )
        return self.output(self.intermediate(attention_output), attention_output), probs


class DebertaCustomConvLayer(nn.Module):
    """v2-xlarge and larger: a 1-D convolution over the embeddings, added to the first layer's output."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        kernel = config.conv_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel, padding=kernel // 2,
                              groups=config.conv_groups)
        self.activation = ACT2FN[config.conv_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, embeddings, layer_output, token_mask):
        # token_mask: [B, N, 1] in the hidden dtype, 0 at padding
        conv_output = self.conv(embeddings.transpose(1, 2)).transpose(1, 2) * token_mask  # [B, N, C]
        conv_output = self.activation(self.dropout(conv_output))
        return self.LayerNorm(layer_output + conv_output) * token_mask


class DebertaCustomEncoder(nn.Module):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([DebertaCustomLayer(config) for _ in range(config.num_hidden_layers)])
        if config.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * config.relative_span, config.hidden_size)
        if config.norm_rel_ebd == "layer_norm":  # exists even without relative attention, as in the checkpoints
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.conv = DebertaCustomConvLayer(config) if config.conv_kernel_size > 0 else None

    def relative_embeddings(self):
        """The relative embedding table [2S, C] as the attention layers read it, or None."""
        if not self.config.relative_attention:
            return None
        table = self.rel_embeddings.weight
        return self.LayerNorm(table) if self.config.norm_rel_ebd == "layer_norm" else table

    def relative_index(self, length, device) -> RelativePositions | None:
        """Relative positions of a length-N sequence against itself (see RelativePositions), or None."""
        if not self.config.relative_attention:
            return None
        return relative_positions(length, length, self.config, device)

    def forward(self, embeddings, token_mask, output_attentions=False, output_hidden_states=False):
        # A row with no real token attends to every position rather than to none, so that softmax stays finite.
        key_mask = token_mask | ~token_mask.any(-1, keepdim=True)
        key_mask = key_mask[:, None, None, :]  # [B, N] -> [B, 1, 1, N]
        # Once per forward, shared by every layer: the key mask, relative positions and the relative table.
        relative = self.relative_index(embeddings.shape[1], embeddings.device)
        rel_embeddings = self.relative_embeddings()

        all_hidden_states = (embeddings,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        hidden_states = embeddings
        for i, layer in enumerate(self.layer):
            hidden_states, probs = layer(hidden_states, key_mask, relative, rel_embeddings,
                                         output_attentions=output_attentions)
            if i == 0 and self.conv is not None:
                hidden_states = self.conv(embeddings, hidden_states, token_mask[..., None].to(hidden_states.dtype))
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings and the base model
# ----------------------------------------------------------------------------------------------------------------------


class DebertaCustomEmbeddings(nn.Module):
    """Word (+ absolute position when position_biased_input) (+ token type) -> [embed_proj] -> LayerNorm -> mask.
    The absolute position table always exists: the Enhanced Mask Decoder adds it before the last layer."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.config = config
        size = config.word_embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, size)
        if config.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, size)
        if size != config.hidden_size:
            self.embed_proj = nn.Linear(size, config.hidden_size, bias=False)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds, token_mask):
        embeddings = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.position_biased_input:
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.config.type_vocab_size > 0:
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.config.word_embedding_size != self.config.hidden_size:
            embeddings = self.embed_proj(embeddings)
        embeddings = self.LayerNorm(embeddings) * token_mask[..., None].to(embeddings.dtype)
        return self.dropout(embeddings)


def train_only_read_position_tables(model: nn.Module) -> None:
    """Relative-only models (position_biased_input false) read the absolute position table only in the Enhanced Mask
    Decoder. Elsewhere it is frozen, so that DistributedDataParallel needs no find_unused_parameters search (and the
    Trainer turns it off under gradient checkpointing) and optimizers skip it; the weight is kept.
    An RTD discriminator's table is a view of its generator's: what it owns (the GDES delta, none under plain
    sharing) is switched, the generator's table follows the generator's own decoder."""
    for module in model.modules():
        if isinstance(module, DebertaCustomEmbeddings):
            for parameter in module.position_embeddings.parameters():
                parameter.requires_grad_(module.config.position_biased_input)
    for module in model.modules():
        if isinstance(module, DebertaCustomForMaskedLM) and module.config.uses_enhanced_mask_decoder:
            module.deberta.embeddings.position_embeddings.weight.requires_grad_(True)


def _can_check_values(tensor: torch.Tensor) -> bool:
    """Whether checking the values of `tensor` is free: it lives on the CPU and nothing is being compiled, exported
    or traced. Reading an accelerator tensor on the host stalls its stream (a device sync), so value checks of
    inputs (id ranges, labels, mask values) run only on CPU tensors; the collators, scripts and tokenizers check the
    data while it is still on the host."""
    return tensor.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def _check_integer_ids(name, ids, upper, what):
    """Ids must be integers in [0, upper). The dtype is always checked, the range where it is free (CPU tensors,
    not while compiling, exporting or tracing: see _can_check_values)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if not _can_check_values(ids) or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= upper:
        raise ValueError(f"{name} holds values in [{low}, {high}], outside [0, {upper - 1}] ({what})")


def _check_attention_mask_values(attention_mask):
    """A float attention mask must hold only 0 and 1 (checked where free, see _can_check_values)."""
    if attention_mask.is_floating_point() and _can_check_values(attention_mask):
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")


class DebertaCustomPreTrainedModel(PreTrainedModel):
    config_class = DebertaCustomConfig
    base_model_prefix = "deberta"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _no_split_modules = ["DebertaCustomLayer", "DebertaCustomEmbeddings"]
    # Checkpoint keys that are never loaded, so transformers does not report them as unused: stale buffers, the legacy
    # head's tied decoder copies, and an RTD pretraining folder's generator (a head loads only its discriminator).
    _keys_to_ignore_on_load_unexpected = [*IGNORED_CHECKPOINT_KEYS, *RTD_PRETRAINING_ONLY_KEYS]
    # What save_pretrained writes as `auto_map`; classes defined in sibling files (modeling_rtd.py) extend it.
    saved_auto_map = AUTO_MAP
    # Whether this class holds RTD pretraining's generator (and loads such folders as they are, without merging).
    holds_rtd_generator = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DebertaCustomSelfAttention) and module.fused_projection:
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, (DebertaCustomLMPredictionHead, DebertaCustomRTDHead)) and hasattr(module, "bias"):
            init.zeros_(module.bias)

    def post_init(self):
        super().post_init()
        train_only_read_position_tables(self)

    def set_attn_implementation(self, attn_implementation: str):
        """Switch attention paths on a live model: the layers read config._attn_implementation at every call."""
        if attn_implementation not in ATTENTION_FUNCTIONS:
            raise ValueError(f"attn_implementation must be one of {sorted(ATTENTION_FUNCTIONS)}, "
                             f"got {attn_implementation!r}")
        self.config._attn_implementation = attn_implementation

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Writes a Hub-ready folder: weights under our names, config with the full `auto_map` (the config and every
        head, so one repo serves every Auto class), and the code files for `trust_remote_code=True` loading."""
        self.config.auto_map = dict(self.saved_auto_map)
        if "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters:
            # transformers >= 5 would write back the names a checkpoint was loaded under (cls.predictions.*, an RTD
            # folder's generator tables); our folders hold our names whatever the model was loaded from.
            kwargs.setdefault("save_original_format", False)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers copies code only for classes registered with an Auto class; the RTD discriminator has none.
        # Copy every file the auto_map names, with the siblings they import, so each folder loads as remote code.
        here = os.path.dirname(os.path.abspath(__file__))
        for module in {target.split(".")[0] for target in self.config.auto_map.values()}:
            source = os.path.join(here, module + ".py")
            for path in [source, *get_relative_import_files(source)]:
                destination = os.path.join(save_directory, os.path.basename(path))
                if not os.path.exists(destination):
                    shutil.copyfile(path, destination)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' own loader (every from_pretrained argument works as for its models: dtype, device_map,
        quantization_config, sharded and Hub checkpoints), reading our folders and the official checkpoints: a folder
        or Hub repo whose config.json has model_type `deberta-v2` or `deberta` (the microsoft/deberta-* repos, or
        transformers' own save_pretrained), renamed on load by `convert.CHECKPOINT_KEY_MAPPING`. RTD pretraining
        folders load into the backbone and every head as the exported discriminator (E_G + E_delta merged).

        Added to transformers' checks: weights of the backbone that the checkpoint lacks raise ValueError naming the
        file (a truncated or foreign checkpoint) instead of being initialised at random; a weight file that cannot
        be read is named; a device_map naming a device this machine lacks says so."""
        check_device_map(kwargs.get("device_map"))
        shared_tables = None if cls.holds_rtd_generator else rtd_shared_tables(
            checkpoint_config_dict(pretrained_model_name_or_path, kwargs))
        key_mapping = {**(kwargs.pop("key_mapping", None) or {}), **CHECKPOINT_KEY_MAPPING,
                       **(RTD_SHARED_TABLE_MAPPING if shared_tables else {})}
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, key_mapping=key_mapping, output_loading_info=True, **kwargs
            )
        except Exception as error:
            unreadable = unreadable_weight_file(pretrained_model_name_or_path, kwargs)
            if unreadable is None:
                raise  # transformers' own error (usage, missing files, sizes) already says what is wrong
            path, reader_error = unreadable
            raise ValueError(f"Could not read the checkpoint file {path}: {reader_error}") from error
        missing = [k for k in info["missing_keys"] if is_required_weight(k, model.config)]
        if missing:
            raise ValueError(
                f"The checkpoint {describe_weight_source(pretrained_model_name_or_path, kwargs)} lacks {len(missing)} "
                f"weights of the model, such as {sorted(missing)[:5]}: the weight file is truncated or holds a "
                "different architecture"
            )
        if shared_tables == "gdes":
            merge_embedding_deltas(model, pretrained_model_name_or_path, kwargs)
        train_only_read_position_tables(model)  # loading installs fresh Parameters
        return (model, info) if output_loading_info else model

    def _validate_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
        """Turn bad input into errors that name the problem instead of failures deep inside torch."""
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
            _check_integer_ids("input_ids", input_ids, config.vocab_size, f"vocab_size={config.vocab_size}")
            shape = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.word_embedding_size:
                raise ValueError(
                    f"inputs_embeds must be [batch, length, {config.word_embedding_size}], "
                    f"got shape {tuple(inputs_embeds.shape)}"
                )
            shape = inputs_embeds.shape[:2]
        if shape[1] == 0:
            raise ValueError("The input sequence is empty (length 0)")
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                             ("position_ids", position_ids)):
            if tensor is not None and tensor.shape != shape and not (name == "position_ids" and tensor.shape == shape[1:]):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the input ids are {tuple(shape)}")
        if attention_mask is not None:
            _check_attention_mask_values(attention_mask)
        # Token types are ignored when the model has none (type_vocab_size 0), as tokenizers emit them for pairs.
        if token_type_ids is not None and config.type_vocab_size > 0:
            _check_integer_ids("token_type_ids", token_type_ids, config.type_vocab_size,
                               f"type_vocab_size={config.type_vocab_size}")
        if config.position_biased_input:
            limit = config.max_position_embeddings
            if position_ids is None and shape[1] > limit:
                raise ValueError(
                    f"Sequence length {shape[1]} exceeds max_position_embeddings={limit}: this model adds absolute "
                    "positions at the input; truncate the input"
                )
            if position_ids is not None:
                _check_integer_ids("position_ids", position_ids, limit, f"max_position_embeddings={limit}")
        return shape

    def _default_position_ids(self, length, device):
        return torch.arange(length, device=device)[None, :]  # [1, N], broadcast over the batch


class DebertaCustomModel(DebertaCustomPreTrainedModel):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.embeddings = DebertaCustomEmbeddings(config)
        self.encoder = DebertaCustomEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings.word_embeddings = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        batch, length = self._validate_inputs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        device = input_ids.device if input_ids is not None else inputs_embeds.device

        token_mask = (
            torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        )
        if position_ids is None:
            position_ids = self._default_position_ids(length, device)
        if token_type_ids is None and self.config.type_vocab_size > 0:
            token_type_ids = torch.zeros(batch, length, dtype=torch.long, device=device)

        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, token_mask)
        outputs = self.encoder(embeddings, token_mask, output_attentions, output_hidden_states)
        return outputs if return_dict else outputs.to_tuple()


# ----------------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------------


def _mean_over_items(total, count, num_items_in_batch=None):
    """A loss summed over `count` items -> its mean, as a sum divided by max(count, 1): a batch with nothing to predict
    (every label -100, or an empty batch) gives 0 with zero gradients instead of NaN. With `num_items_in_batch` (what
    transformers' Trainer passes: the labelled items of every micro-batch of one optimizer step) the sum is divided by
    that instead, so that gradient accumulation gives the loss and gradients of one large batch."""
    if num_items_in_batch is None:
        return total / count.clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch.to(total.device).clamp(min=1)
    return total / max(num_items_in_batch, 1)


def _cross_entropy_sum(logits, labels):
    """Summed cross-entropy [..., K] logits against [...] labels, -100 ignored; computed in float32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="sum")


def _binary_cross_entropy_sum(logits, labels, counted):
    """Summed binary cross-entropy of logits against 0/1 labels where `counted` (same shapes); float32."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels.clamp(min=0).float(), reduction="none")
    return torch.where(counted, losses, 0.0).sum()


def sparse_prediction_positions(labels: torch.Tensor, max_fraction: float) -> torch.Tensor:
    """[K] positions of a [B, N] batch, as indices into its flattened B * N positions, at which the masked-LM head
    computes vocabulary logits: every labelled position (labels != -100) in row-major order, then the first unlabelled
    ones, K = ceil(max_fraction * B * N) in all (at most B * N).

    Why this shape: gathering exactly the labelled positions (boolean indexing) gives a shape known only after a host
    sync, which stalls an accelerator's stream every step and breaks compiled graphs. K depends on the shapes only, so
    the vocabulary projection (the largest cost of masked-LM pretraining with a 128k vocabulary) still runs on a
    fraction of the tokens, and the first (number of labelled) rows hold exactly what boolean indexing gave. A batch
    with more than K labelled positions raises (config.sparse_mlm_max_fraction sets K): on CPU tensors a ValueError,
    on accelerators a device-side assertion (no sync)."""
    labelled = (labels != -100).flatten()  # [B * N]
    total = labelled.shape[0]
    budget = min(total, math.ceil(max_fraction * total))
    _check_prediction_budget(labelled, budget, max_fraction)
    # A stable sort keeps row-major order within the labelled and within the unlabelled positions.
    order = torch.sort(labelled.to(torch.int8), descending=True, stable=True).indices  # [B * N]
    return order[:budget]


def _check_prediction_budget(labelled, budget, max_fraction):
    remedy = "raise config.sparse_mlm_max_fraction (up to 1.0) or set config.sparse_mlm_logits=False"
    if _can_check_values(labelled):
        count = int(labelled.sum())
        if count > budget:
            raise ValueError(f"The labels hold {count} labelled positions, more than {budget} (sparse_mlm_max_fraction="
                             f"{max_fraction} of {labelled.shape[0]} positions) in this batch: {remedy}")
    elif not torch.jit.is_tracing():  # a device-side assertion: no sync (a constant message: values may be symbolic)
        torch._assert_async(labelled.sum() <= budget,
                            "More labelled positions than config.sparse_mlm_max_fraction allows: " + remedy)


class DebertaCustomLMPredictionHead(nn.Module):
    """dense -> activation -> LayerNorm -> tied word-embedding decoder + bias. State-dict names follow the official
    checkpoints: `lm_predictions.lm_head.{dense,LayerNorm,bias}`."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.word_embedding_size)
        self.activation = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.word_embedding_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states, word_embeddings: nn.Embedding):
        hidden_states = self.LayerNorm(self.activation(self.dense(hidden_states)))
        return F.linear(hidden_states, word_embeddings.weight, self.bias)  # [..., V]


class DebertaCustomOnlyMLMHead(nn.Module):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.lm_head = DebertaCustomLMPredictionHead(config)


class DebertaCustomForMaskedLM(DebertaCustomPreTrainedModel):
    """Masked-LM with the Enhanced Mask Decoder (EMD, paper section 3.2) when absolute positions are not at the input:
    keys and values are the second-to-last layer's output; the first query is that output plus the absolute position
    embedding; the last encoder layer is applied `emd_num_passes` times with shared weights, each output becoming the
    next query; the LM head reads the final pass. With position_biased_input (or use_enhanced_mask_decoder false) the
    head reads the last layer."""

    # transformers' Trainer passes num_items_in_batch (the labelled tokens of every micro-batch of one optimizer step)
    # to models that declare this, and then no longer divides their loss by the accumulation steps.
    accepts_loss_kwargs = True

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        if config.uses_enhanced_mask_decoder and config.word_embedding_size != config.hidden_size:
            raise ValueError("The Enhanced Mask Decoder needs embedding_size == hidden_size (it adds absolute position "
                             f"embeddings to hidden states); got {config.embedding_size} and {config.hidden_size}")
        self.deberta = DebertaCustomModel(config)
        self.lm_predictions = DebertaCustomOnlyMLMHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.deberta.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings):
        self.deberta.embeddings.word_embeddings = new_embeddings

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, **kwargs):
        """The decoder is the word-embedding matrix itself, so only the output bias needs resizing alongside it."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)
        _resize_vector(self.lm_predictions.lm_head, "bias", embeddings.num_embeddings)
        return embeddings

    def enhanced_mask_decoder(self, hidden_states, token_mask, position_ids):
        """hidden_states: all layer outputs from the encoder. Returns the final decoder pass [B, N, C]."""
        encoder = self.deberta.encoder
        context = hidden_states[-2]  # keys and values: the second-to-last layer
        query = context + self.deberta.embeddings.position_embeddings(position_ids)
        key_mask = (token_mask | ~token_mask.any(-1, keepdim=True))[:, None, None, :]
        rel_index = encoder.relative_index(context.shape[1], context.device)
        rel_embeddings = encoder.relative_embeddings()
        last_layer = encoder.layer[-1]
        for _ in range(self.config.emd_num_passes):
            # Positional: reentrant gradient checkpointing only re-feeds positional tensors to the recomputation.
            query, _ = last_layer(context, key_mask, rel_index, rel_embeddings, query)
        return query

    def decode(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
               output_attentions=None, output_hidden_states=None):
        """Backbone, then the Enhanced Mask Decoder where it applies: (backbone outputs, hidden states [B, N, C] that
        the LM head reads)."""
        use_emd = self.config.uses_enhanced_mask_decoder
        outputs = self.deberta(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=True if use_emd else output_hidden_states,
            return_dict=True,
        )
        if not use_emd:
            return outputs, outputs.last_hidden_state
        batch, length = outputs.last_hidden_state.shape[:2]
        device = outputs.last_hidden_state.device
        limit = self.config.max_position_embeddings
        if position_ids is None:
            if length > limit:
                raise ValueError(f"Sequence length {length} exceeds max_position_embeddings={limit}, which the "
                                 "Enhanced Mask Decoder needs for absolute positions; truncate the input")
            position_ids = self._default_position_ids(length, device)
        else:
            _check_integer_ids("position_ids", position_ids, limit, f"max_position_embeddings={limit}")
        token_mask = (attention_mask.bool() if attention_mask is not None
                      else torch.ones(batch, length, dtype=torch.bool, device=device))
        return outputs, self.enhanced_mask_decoder(outputs.hidden_states, token_mask, position_ids)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        num_items_in_batch=None,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        outputs, sequence_output = self.decode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                               output_attentions, output_hidden_states)
        lm_head, word_embeddings = self.lm_predictions.lm_head, self.deberta.embeddings.word_embeddings
        loss = None
        if labels is not None:
            _check_labels(labels, sequence_output.shape[:2], self.config.vocab_size, "labels")
            targets = labels
            if self.training and self.config.sparse_mlm_logits:
                # Vocabulary logits only at K positions, the labelled ones first (see sparse_prediction_positions).
                positions = sparse_prediction_positions(labels, self.config.sparse_mlm_max_fraction)  # [K]
                sequence_output = sequence_output.flatten(0, 1).index_select(0, positions)  # [B, N, C] -> [K, C]
                targets = labels.flatten().index_select(0, positions)  # [K], -100 past the labelled rows
            logits = lm_head(sequence_output, word_embeddings)  # [B, N, V], or [K, V] when sparse
            loss = _mean_over_items(_cross_entropy_sum(logits, targets), (labels != -100).sum(), num_items_in_batch)
        else:
            logits = lm_head(sequence_output, word_embeddings)

        hidden_states = outputs.hidden_states if output_hidden_states else None
        result = MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=outputs.attentions)
        return result if return_dict else result.to_tuple()


def _head_output(output_class, return_dict, encoder_outputs, **fields):
    """A head's output dataclass, carrying the encoder's hidden states and attentions; for return_dict=False the
    tuple transformers users expect: (loss,) when present, then the head's tensors, then the optional encoder ones."""
    result = output_class(**fields, hidden_states=encoder_outputs.hidden_states, attentions=encoder_outputs.attentions)
    return result if return_dict else result.to_tuple()


def _resize_vector(module, name, new_size):
    """Resize a 1-D parameter (an output bias) to new_size, keeping old values and zero-filling new entries."""
    old = getattr(module, name)
    if old.shape[0] == new_size:
        return
    new = torch.zeros(new_size, dtype=old.dtype, device=old.device)
    keep = min(new_size, old.shape[0])
    new[:keep] = old.data[:keep]
    setattr(module, name, nn.Parameter(new))


def _check_labels(labels, expected_shape, num_classes, name):
    """Class labels: integers in [0, num_classes) or -100 (ignored), of the expected shape (values checked where
    that is free: see _can_check_values)."""
    if labels.is_floating_point():
        raise TypeError(f"{name} must be integer class ids for this head, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"{name} has shape {tuple(labels.shape)}, expected {tuple(expected_shape)}")
    if not _can_check_values(labels):
        return
    valid = (labels == -100) | ((labels >= 0) & (labels < num_classes))
    if not bool(valid.all()):
        bad = labels[~valid][0].item()
        raise ValueError(f"{name} holds {bad}, outside [0, {num_classes - 1}] (use -100 to ignore a position)")


class DebertaCustomContextPooler(nn.Module):
    """First token -> dropout -> dense -> activation."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        size = config.pooler_hidden_size or config.hidden_size
        self.dense = nn.Linear(config.hidden_size, size)
        self.dropout = nn.Dropout(config.pooler_dropout)
        self.activation = ACT2FN[config.pooler_hidden_act]

    def forward(self, hidden_states):
        return self.activation(self.dense(self.dropout(hidden_states[:, 0])))


def _classifier_dropout(config: DebertaCustomConfig) -> nn.Dropout:
    return nn.Dropout(config.hidden_dropout_prob if config.cls_dropout is None else config.cls_dropout)


class DebertaCustomForSequenceClassification(DebertaCustomPreTrainedModel):
    """Pooled first token -> classifier. The loss follows config.problem_type as transformers does: regression
    (MSE), single_label_classification (cross-entropy) or multi_label_classification (BCE with logits); when unset
    it is inferred from num_labels and the labels' dtype."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.deberta = DebertaCustomModel(config)
        self.pooler = DebertaCustomContextPooler(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.pooler_hidden_size or config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(self.pooler(outputs.last_hidden_state)))  # [B, num_labels]
        loss = None if labels is None else self.sequence_classification_loss(logits, labels)
        return _head_output(SequenceClassifierOutput, return_dict, outputs, loss=loss, logits=logits)

    def sequence_classification_loss(self, logits, labels):
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        batch = logits.shape[0]
        if problem_type == "regression":
            if labels.numel() != batch * self.num_labels:
                raise ValueError(f"Regression labels have shape {tuple(labels.shape)}; expected {batch} x "
                                 f"{self.num_labels} values")
            return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
        if problem_type == "single_label_classification":
            if labels.dim() == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            _check_labels(labels, (batch,), self.num_labels, "labels")
            return _mean_over_items(_cross_entropy_sum(logits, labels), (labels != -100).sum())
        if problem_type == "multi_label_classification":
            if tuple(labels.shape) != (batch, self.num_labels):
                raise ValueError(f"Multi-label labels have shape {tuple(labels.shape)}, expected "
                                 f"{(batch, self.num_labels)}")
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        raise ValueError(f"Unknown config.problem_type {problem_type!r}")


class DebertaCustomForTokenClassification(DebertaCustomPreTrainedModel):
    accepts_loss_kwargs = True  # num_items_in_batch, as for the masked-LM head

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.deberta = DebertaCustomModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        num_items_in_batch=None,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # [B, N, num_labels]
        loss = None
        if labels is not None:
            _check_labels(labels, logits.shape[:2], self.num_labels, "labels")
            loss = _mean_over_items(_cross_entropy_sum(logits, labels), (labels != -100).sum(), num_items_in_batch)
        return _head_output(TokenClassifierOutput, return_dict, outputs, loss=loss, logits=logits)


class DebertaCustomForQuestionAnswering(DebertaCustomPreTrainedModel):
    """Span extraction: start and end logits per token. Positions outside the sequence are ignored in the loss."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"Question answering needs num_labels=2 (start, end), got {config.num_labels}")
        self.deberta = DebertaCustomModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, return_dict=True)
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(-1)  # 2 x [B, N]
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("Pass both start_positions and end_positions, or neither")
        if start_positions is not None:
            length = start_logits.shape[1]
            positions = []
            for name, value in (("start_positions", start_positions), ("end_positions", end_positions)):
                if value.is_floating_point():
                    raise TypeError(f"{name} must be integer token positions, got dtype {value.dtype}")
                value = value.reshape(-1)
                if value.shape[0] != start_logits.shape[0]:
                    raise ValueError(f"{name} has {value.shape[0]} entries for a batch of {start_logits.shape[0]}")
                value = value.clamp(0, length)  # as transformers: below 0 -> 0; past the window -> ignored
                positions.append(value.masked_fill(value == length, -100))  # the answer is not in this window
            loss = sum(_mean_over_items(_cross_entropy_sum(logits, target), (target != -100).sum())
                       for logits, target in zip((start_logits, end_logits), positions, strict=True)) / 2
        return _head_output(QuestionAnsweringModelOutput, return_dict, outputs, loss=loss, start_logits=start_logits,
                            end_logits=end_logits)


class DebertaCustomForMultipleChoice(DebertaCustomPreTrainedModel):
    """Inputs [B, num_choices, N]: each choice is encoded, pooled and scored; softmax over choices."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.deberta = DebertaCustomModel(config)
        self.pooler = DebertaCustomContextPooler(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.pooler_hidden_size or config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        expected_rank = 3 if input_ids is not None else 4
        if reference.dim() != expected_rank:
            raise ValueError(
                f"Multiple choice takes {'input_ids' if input_ids is not None else 'inputs_embeds'} of rank "
                f"{expected_rank} ([batch, num_choices, length{', hidden' if expected_rank == 4 else ''}]), "
                f"got shape {tuple(reference.shape)}"
            )
        batch, num_choices = reference.shape[:2]

        def flatten(tensor):  # [B, K, N, ...] -> [B * K, N, ...]
            return None if tensor is None else tensor.reshape(batch * num_choices, *tensor.shape[2:])

        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                             ("position_ids", position_ids)):
            if tensor is not None and tuple(tensor.shape) != tuple(reference.shape[:3]):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape[:3])}")
        outputs = self.deberta(flatten(input_ids), flatten(attention_mask), flatten(token_type_ids),
                               flatten(position_ids), flatten(inputs_embeds), output_attentions,
                               output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(self.pooler(outputs.last_hidden_state)))  # [B * K, 1]
        logits = logits.view(batch, num_choices)
        loss = None
        if labels is not None:
            _check_labels(labels, (batch,), num_choices, "labels")
            loss = _mean_over_items(_cross_entropy_sum(logits, labels), (labels != -100).sum())
        return _head_output(MultipleChoiceModelOutput, return_dict, outputs, loss=loss, logits=logits)


class DebertaCustomRTDHead(nn.Module):
    """Replaced-token-detection head (DeBERTaV3), official names `mask_predictions.{dense,LayerNorm,classifier}`:
    LayerNorm(h + h[CLS]) -> dense -> activation -> one logit per token."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden_states):
        hidden_states = self.LayerNorm(hidden_states + hidden_states[:, :1])
        return self.classifier(self.activation(self.dense(hidden_states))).squeeze(-1)  # [B, N]



@dataclass
class ReplacedTokenDetectionOutput(ModelOutput):
    """loss: BCE over non-padding tokens; logits [B, N]: > 0 means "replaced"."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class DebertaCustomForReplacedTokenDetection(DebertaCustomPreTrainedModel):
    """The DeBERTaV3 discriminator: one logit per token saying whether it was replaced. `labels` [B, N] hold 1
    (replaced), 0 (original) or -100 (ignored); padding never counts (put -100 there too when training with
    gradient accumulation: the Trainer's num_items_in_batch counts every label that is not -100)."""

    accepts_loss_kwargs = True

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.deberta = DebertaCustomModel(config)
        self.mask_predictions = DebertaCustomRTDHead(config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        num_items_in_batch=None,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, return_dict=True)
        logits = self.mask_predictions(outputs.last_hidden_state)  # [B, N]
        loss = None
        if labels is not None:
            _check_labels(labels, logits.shape, 2, "labels")
            counted = labels != -100
            if attention_mask is not None:
                counted = counted & attention_mask.bool()
            loss = _mean_over_items(_binary_cross_entropy_sum(logits, labels, counted), counted.sum(),
                                    num_items_in_batch)
        return _head_output(ReplacedTokenDetectionOutput, return_dict, outputs, loss=loss, logits=logits)


__all__ = [
    "DebertaCustomPreTrainedModel",
    "DebertaCustomModel",
    "DebertaCustomForMaskedLM",
    "DebertaCustomForSequenceClassification",
    "DebertaCustomForTokenClassification",
    "DebertaCustomForQuestionAnswering",
    "DebertaCustomForMultipleChoice",
    "DebertaCustomForReplacedTokenDetection",
]
