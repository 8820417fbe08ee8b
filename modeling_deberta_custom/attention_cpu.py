"""CPU speed tricks for the `sdpa` attention path: memory layouts, tiling and a training kernel that were measured
on CPU and are used only there (attention.relative_positions prepares a CpuLayout for CPU tensors run eagerly, and
attention.sdpa_attention then calls `cpu_sdpa_attention`; under torch.compile / export / tracing and on every other
device the plain path runs: one additive bias, one SDPA call).

The constants were measured with benchmarks/benchmark.py on a 2-core AMD EPYC CPU (torch 2.13.0, transformers 5.24.0,
a machine shared with other jobs); on another CPU other values may win. The results equal the plain path's to fp32
rounding (tests/test_attention_paths.py).

What the tricks buy on that machine (DeBERTa-v3-base geometry, against one [B, H, N, N] bias and one SDPA call):
- Products by distance (short sequences) or by table row plus gathers (long ones) instead of [N, 2S] products per
  head gathered into [N, N]: no [B, H, N, 2S] product table for the gathers to read.
- Tiles of heads and query rows (TILE_ELEMENTS): transient memory grows with N x N only per tile.
- Far-key blocks: for long sequences, keys beyond the table's reach read one row, broadcast instead of gathered.
- A training kernel (_cpu_training_attention): on CPU, SDPA with a bias that needs a gradient (or with dropout)
  falls back to its math path, which keeps copies of the scaled query and key; one head at a time keeps less.

This file is copied with the modeling file as remote code, so it imports only torch.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


def cpu_kernels_apply(device) -> bool:
    """True where the tricks below are used: CPU tensors, run eagerly. Under torch.compile, torch.export or
    TorchScript tracing the graph must serve every length and the compiler plans memory itself, so the plain path
    is traced there (which also makes one graph for every sequence length)."""
    if torch.device(device).type != "cpu":
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling()
                or getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)())


class FarDistances(NamedTuple):
    """Every distance d <= low reads table row low_row, every d >= high reads high_row: the outermost buckets, and
    distances past the table, which clamp to its last rows."""

    low: int
    low_row: int
    high: int
    high_row: int


class CpuLayout(NamedTuple):
    """What the CPU kernels read besides RelativePositions.rows (attention.relative_positions builds it for CPU
    tensors run eagerly): `one_row_per_distance` (short sequences: no bucket merges two distances, the rows are
    arange, only those rows are projected), else `index` [Nq, Nk] (the row of every pair, rows[i - j + Nk - 1]),
    `flat_index` (index * Nk + j) and `far` (the distances at both ends that share one row)."""

    one_row_per_distance: bool
    index: torch.Tensor | None = None
    flat_index: torch.Tensor | None = None
    far: FarDistances | None = None


def cpu_layout_of(rows: torch.Tensor, index: torch.Tensor, query_length: int, key_length: int) -> CpuLayout:
    """The layout of sequences whose distances share rows: index [Nq, Nk] of the per-distance rows [Nq + Nk - 1]."""
    flat_index = index * key_length + torch.arange(key_length, device=index.device)
    return CpuLayout(False, index, flat_index, far_distances(rows, query_length, key_length))


def one_row_per_distance(query_length: int, key_length: int, config) -> bool:
    """True when every distance reads a row of its own: |d| up to position_buckets // 2 stays as it is in the log
    buckets, and up to S - 1 nothing is clamped. Decided on Python ints, so it costs no host sync."""
    longest = max(query_length, key_length) - 1
    limit = config.position_buckets // 2 if config.position_buckets > 0 else config.relative_span - 1
    return longest <= limit


def far_distances(rows: torch.Tensor, query_length: int, key_length: int) -> FarDistances:
    """The runs of equal rows at both ends of the per-distance rows [Nq + Nk - 1] (CPU tensor: reading it costs no
    device sync). Rows grow with the distance."""
    low = int((rows == rows[0]).sum()) - 1 - (key_length - 1)
    high = query_length - 1 - (int((rows == rows[-1]).sum()) - 1)
    return FarDistances(low, int(rows[0]), high, int(rows[-1]))


# The position products are laid out by distance (N x (Nq + Nk - 1) products, then strided views, no gather) or by
# table row (N x R products, then one gather per term). Measured on the 2-core AMD EPYC CPU (benchmarks/benchmark.py,
# torch 2.13.0): when every distance has a row of its own the two cost the same products and the distance layout
# saves the gathers; otherwise gathering is faster for inference, but torch.gather keeps its [N, R] input for
# backward, so training stays with the distance layout while there are at most this many distances per table row
# (sequences up to about 1000 tokens with 256 buckets), which keeps no tensor larger than the projections for
# backward.
DISTANCE_LAYOUT_MAX_RATIO_TRAINING = 2


def uses_distance_layout(relative, query_length: int, key_length: int, training: bool) -> bool:
    if relative.cpu.one_row_per_distance:
        return True
    return training and query_length + key_length - 1 <= DISTANCE_LAYOUT_MAX_RATIO_TRAINING * relative.num_rows


# Heads are worked through in groups (and, for inference, the query rows of long sequences in blocks) so that the
# position products and the additive mask of one tile stay near this many elements (128 MiB in fp32): transient
# memory then grows with N x N only per tile. Up to 512 tokens (and batch 2) a layer is one tile: every tile costs a
# dozen kernel launches, and on a machine whose cores are shared each parallel region waits for its slowest thread
# (measured on the 2-core AMD EPYC CPU, torch 2.13.0: 2-3x slower with 16 MiB tiles). Smaller tiles can win on an
# idle machine, where they stay in cache and the allocator recycles their memory instead of mapping fresh pages
# (~1 ms per MiB of page faults on that machine).
TILE_ELEMENTS = 1 << 25
MIN_BLOCK_ROWS = 256  # SDPA slows down on shorter query blocks (same machine)


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
    of 16 columns (CPU GEMMs took twice as long on an odd width on the 2-core EPYC; the extra columns are never
    read)."""
    key_table = query_table = None
    if pos_key is not None:
        if by_distance:
            pos_key = pos_key.flip(-2) if relative.cpu.one_row_per_distance else pos_key[:, relative.rows.flip(0)]
        key_table = _table_operand(pos_key, c2p_scale)
    if pos_query is not None:
        if by_distance:
            pos_query = pos_query if relative.cpu.one_row_per_distance else pos_query[:, relative.rows]
            query_table = _table_operand(pos_query, p2c_scale)
        else:
            query_table = pos_query * p2c_scale
    return key_table, query_table


def position_products(query, key, tables, key_bias, by_distance):
    """The position products, heads-major, each None when its term is off:

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
    the table's reach (relative.cpu.far) take one row of each term, broadcast, instead of a gather."""
    key_length = key_bias.shape[-1]
    if by_distance:
        if c2p is not None:
            c2p = _diagonals(c2p, key_length)[:, :, start:stop]  # [H, B, rows, Nk]
        if p2c is not None:
            p2c = _diagonals(p2c, query_length)[..., start:stop].transpose(-1, -2)  # [H, B, rows, Nk]
        if c2p is not None and p2c is not None:
            return (c2p + p2c).transpose(0, 1)  # [H, B, rows, Nk] -> [B, H, rows, Nk]
    else:
        first_key, stop_key = _gathered_keys(relative.cpu.far, start, stop, key_length)
        band = slice(first_key, stop_key)
        heads, batch = (c2p if c2p is not None else p2c).shape[:2]
        rows, width = stop - start, stop_key - first_key
        gathered = key_bias[:, None, band]  # [B, 1, width]: the mask alone while p2c (which carries it) is off
        if p2c is not None:
            index = relative.cpu.flat_index[start:stop, band].reshape(1, 1, rows * width).expand(heads, batch, -1)
            gathered = torch.gather(p2c.flatten(-2), -1, index).view(heads, batch, rows, width)
        if c2p is not None:
            index = relative.cpu.index[start:stop, band].expand(heads, batch, rows, width)
            # in place: the gather's backward does not need its result
            gathered = torch.gather(c2p[:, :, start:stop], -1, index).add_(gathered)
        if width == key_length:
            return gathered.transpose(0, 1)
        # Keys left of the band are so far behind every query of the block that they all read far.high_row, keys
        # right of it all read far.low_row: one row of each term, broadcast.
        left = _far_scores(c2p, p2c, key_bias, relative.cpu.far.high_row, start, stop, slice(0, first_key))
        right = _far_scores(c2p, p2c, key_bias, relative.cpu.far.low_row, start, stop, slice(stop_key, None))
        return torch.cat([left, gathered, right], dim=-1).transpose(0, 1)
    if c2p is None:
        return p2c.contiguous().transpose(0, 1)
    return (c2p + key_bias[:, None, :]).transpose(0, 1)


def disentangled_bias(query, key, pos_key, pos_query, relative, key_mask, scale, training=False):
    """c2p + p2c for every pair, scaled, masked keys at a large negative value: [B, H, Nq, Nk], built in the layout
    cpu_sdpa_attention takes (the same values as attention.position_scores plus the mask)."""
    query_length = query.shape[-2]
    by_distance = uses_distance_layout(relative, query_length, key.shape[-2], training)
    key_bias = key_bias_of(key_mask, query.dtype)
    tables = position_tables(pos_key, pos_query, relative, by_distance, scale, scale)
    c2p, p2c = position_products(query, key, tables, key_bias, by_distance)
    return position_bias(c2p, p2c, key_bias, relative, by_distance, query_length, 0, query_length)


def _attention_tiles(batch, heads, query_length, key_length, width, training, far=None):
    """(heads per group, query rows per block): groups of equal size whose products ([Nq + Nk, W] per head) and
    additive mask ([rows, Nk] per head) stay within TILE_ELEMENTS. For inference with keys beyond the table's reach
    (`far`, gathered layout), blocks of MIN_BLOCK_ROWS rows: each then gathers only the keys within its reach
    (_gathered_keys) and broadcasts the rest."""
    products = batch * (query_length + key_length) * width  # per head
    mask = batch * query_length * key_length  # per head, all rows
    groups = -(-heads * (products + mask) // TILE_ELEMENTS)  # ceil
    heads_per_group = -(-heads // min(max(groups, 1), heads))
    rows_per_block = query_length
    if heads_per_group == 1 and products + mask > TILE_ELEMENTS and not training:
        rows_per_block = max(MIN_BLOCK_ROWS, (TILE_ELEMENTS - products) // (batch * key_length))
    if not training and far is not None and MIN_BLOCK_ROWS + far.high - far.low - 2 < key_length:
        rows_per_block = min(rows_per_block, MIN_BLOCK_ROWS)  # a block's gathered keys: rows + high - low - 2
    return heads_per_group, rows_per_block


def _cpu_training_attention(query, key, value, pos_key, pos_query, relative, key_bias, scale, dropout, by_distance):
    """Training on CPU. There SDPA computes a mask that needs a gradient (or dropout) with its math fallback, which
    keeps contiguous copies of the scaled query and key for backward and takes the mask as a separate tensor. The
    same math written out here runs one head at a time: the scores, the position products and the context of a head
    are plain matrix products of [B, N, D] slices of the projections (no copies kept for backward), the position
    terms are added into the scores in place, and each head's tensors stay small enough for the allocator to
    recycle (see TILE_ELEMENTS), backward included. Chosen by module.training, never by grad mode, so reentrant
    gradient checkpointing recomputes with this same kernel and the same dropout draws. Returns [B, H, Nq, D] (a
    view of [B, Nq, H, D])."""
    query_length = query.shape[-2]
    tables = position_tables(pos_key, pos_query, relative, by_distance, 1.0, scale)  # the query is scaled below
    # unbind rather than index per head: its backward stacks the heads' gradients once, where indexing would fill a
    # zero tensor of the whole projection for every head and add them up.
    queries, keys, values = (query * scale).unbind(1), key.unbind(1), value.unbind(1)  # H x [B, N, D]
    tables = [None if table is None else table.unbind(0) for table in tables]  # H x table of one head
    contexts = []
    for head in range(len(queries)):
        head_tables = tuple(None if table is None else table[head][None] for table in tables)
        c2p, p2c = position_products(queries[head][:, None], keys[head][:, None], head_tables, key_bias, by_distance)
        bias = position_bias(c2p, p2c, key_bias, relative, by_distance, query_length, 0, query_length)[:, 0]
        scores = torch.matmul(queries[head], keys[head].transpose(-1, -2))  # [B, Nq, Nk]
        scores = scores.add_(bias)  # in place: the product's backward does not need its result
        probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout)
        contexts.append(torch.matmul(probs, values[head]))  # [B, Nq, D]
    return torch.stack(contexts, dim=2).transpose(1, 2)


def cpu_sdpa_attention(query, key, value, pos_key, pos_query, relative, key_mask, scale, dropout, training):
    """The `sdpa` path on CPU: in training the per-head kernel above; in inference torch's fused SDPA with the
    position terms as its additive mask, built from the position products one tile of heads and query rows at a
    time. Layout and tiles depend on the shapes and `training` only. `dropout` is already 0 outside training."""
    batch, heads, query_length, key_length = *query.shape[:3], key.shape[-2]
    by_distance = uses_distance_layout(relative, query_length, key_length, training)
    key_bias = key_bias_of(key_mask, query.dtype)
    if training:
        return _cpu_training_attention(query, key, value, pos_key, pos_query, relative, key_bias, scale, dropout,
                                       by_distance)
    width = query_length + key_length - 1 if by_distance else relative.num_rows
    far = None if by_distance else relative.cpu.far  # only gathers skip far keys
    heads_per_group, rows_per_block = _attention_tiles(batch, heads, query_length, key_length, width, training, far)
    tables = position_tables(pos_key, pos_query, relative, by_distance, scale, scale)
    if heads_per_group == heads and rows_per_block >= query_length:  # a single tile
        c2p, p2c = position_products(query, key, tables, key_bias, by_distance)
        bias = position_bias(c2p, p2c, key_bias, relative, by_distance, query_length, 0, query_length)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
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
                                                     attn_mask=bias, scale=scale)
            blocks.append(context.transpose(1, 2))  # [B, rows, heads in group, D]
        groups.append(torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0])
    # Concatenated as [B, Nq, H, D], so that the caller's transpose back to [B, N, H * D] is a view, not a copy.
    return torch.cat(groups, dim=2).transpose(1, 2)
