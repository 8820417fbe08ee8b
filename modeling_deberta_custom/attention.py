"""Disentangled attention (DeBERTa paper section 3.1): relative positions, the position terms c2p / p2c, every
attention implementation (eager reference, sdpa, flex_attention) behind one dispatch table, and the self-attention
module that projects content and positions and calls them.

Notation in shape comments: B batch, N sequence length, H heads, D head size, C hidden size, S relative span (the
relative embedding table has 2S rows), R rows of that table a layer projects.

Part of the remote-code wing (copied next to the weights by `save_pretrained`): imports only torch, transformers'
config and its sibling files. CPU-only layouts and kernels live in attention_cpu.py, reached by one branch
(relative_positions).
"""

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention_cpu import CpuLayout, cpu_kernels_apply, cpu_layout_of, cpu_sdpa_attention, one_row_per_distance
from .configuration_deberta_custom import DebertaCustomConfig
from .padding import SequenceLayout

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


class RelativePositions(NamedTuple):
    """Relative positions of a query sequence against a key sequence, prepared once per forward for every layer.

    Scores depend on query i and key j only through the distance d = i - j: `rows[d + Nk - 1]` is the row of the
    relative embedding table that distance d reads, for d from -(Nk - 1) up to Nq - 1 ([Nq + Nk - 1]), counted from
    `first_row`; the attention layers project only the table rows [first_row, first_row + num_rows). `index` [Nq, Nk]
    holds the row of every pair, rows[i - j + Nk - 1] (pair_index), built once per forward for the paths that gather
    with it (eager, sdpa); None for flex_attention, which reads `rows` inside its kernel (no [Nq, Nk] tensor).

    Everywhere but eager CPU runs the whole table is read (first_row 0, num_rows 2S) and `cpu` is None. On CPU, `cpu`
    holds the layouts of attention_cpu.py (CpuLayout), and short sequences project only the rows they read."""

    rows: torch.Tensor
    first_row: int
    num_rows: int
    cpu: CpuLayout | None = None
    index: torch.Tensor | None = None


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


def relative_positions(query_length: int, key_length: int, config: DebertaCustomConfig, device) -> RelativePositions:
    """Everything the attention layers need about relative positions (see RelativePositions); computed once per
    forward from the lengths, so that no layer repeats it. Only Python ints decide the branches: no host sync, and
    under torch.compile one graph serves every length."""
    # The one branch into attention_cpu.py: its layouts here, then its kernels (sdpa_attention). flex_attention reads
    # only `rows`, so it gets nothing else, on any device (no [Nq, Nk] index: attention memory stays linear in N).
    if config._attn_implementation == "flex_attention":
        return RelativePositions(relative_distance_rows(query_length, key_length, config, device), 0,
                                 2 * config.relative_span)
    if not cpu_kernels_apply(device):
        rows = relative_distance_rows(query_length, key_length, config, device)
        return RelativePositions(rows, 0, 2 * config.relative_span, index=pair_index(rows, query_length, key_length))
    if one_row_per_distance(query_length, key_length, config):
        num_rows = query_length + key_length - 1
        first_row = config.relative_span - (key_length - 1)  # the row of d = -(Nk - 1)
        return RelativePositions(torch.arange(num_rows, device=device), first_row, num_rows,
                                 CpuLayout(one_row_per_distance=True))
    rows = relative_distance_rows(query_length, key_length, config, device)
    index = pair_index(rows, query_length, key_length)  # [Nq, Nk]
    return RelativePositions(rows, 0, 2 * config.relative_span, cpu_layout_of(rows, index, query_length, key_length),
                             index)


# ----------------------------------------------------------------------------------------------------------------------
# Key mask
# ----------------------------------------------------------------------------------------------------------------------


class KeyMask(NamedTuple):
    """Which keys the queries attend, prepared once per forward and shared by every layer: `keys` [B, 1, 1, Nk]
    (True = attend) and, for flex_attention, the same mask as FlexAttention blocks (flex_key_blocks), so that no
    layer rebuilds it."""

    keys: torch.Tensor
    flex_blocks: object | None = None  # torch.nn.attention.flex_attention.BlockMask


def prepare_key_mask(token_mask: torch.Tensor, implementation: str | None) -> KeyMask:
    """[B, N] token mask (True = real token) -> the KeyMask of self-attention over those tokens. A row with no real
    token attends to every position rather than to none, so that softmax stays finite."""
    keys = (token_mask | ~token_mask.any(-1, keepdim=True))[:, None, None, :]  # [B, N] -> [B, 1, 1, N]
    blocks = flex_key_blocks(keys, token_mask.shape[-1]) if implementation == "flex_attention" else None
    return KeyMask(keys, blocks)


# ----------------------------------------------------------------------------------------------------------------------
# Disentangled attention
#
# Every implementation takes (query, key, value, pos_key, pos_query, relative, mask, scale, dropout, training) and
# returns (context [B, H, Nq, D], probabilities or None); DebertaCustomSelfAttention picks one from
# ATTENTION_FUNCTIONS by config._attn_implementation. Speed tricks measured on CPU live in attention_cpu.py.
# ----------------------------------------------------------------------------------------------------------------------


def position_scores(query, key, pos_key, pos_query, relative, scale):
    """c2p + p2c for every (query, key) pair, each term scaled before the sum (which keeps half precision in range):
    [B, H, Nq, Nk], or None without position terms. query [B, H, Nq, D]; key [B, H, Nk, D]; pos_key (c2p) and
    pos_query (p2c) [H, R, D] or None: the projected rows of the relative table that `relative` reads."""
    batch, heads, query_length, key_length = *query.shape[:3], key.shape[-2]
    if pos_key is None and pos_query is None:
        return None
    index = relative.index  # [Nq, Nk], once per forward
    if index is None:  # CPU short sequences (one row per distance): built here, small
        index = pair_index(relative.rows, query_length, key_length)
    scores = 0
    if pos_key is not None:  # c2p[i, j] = Q_i . K_r[index[i, j]]
        c2p_table = torch.matmul(query * scale, pos_key.transpose(-1, -2))  # [B, H, Nq, R]
        scores = scores + torch.gather(c2p_table, -1, index.expand(batch, heads, query_length, key_length))
    if pos_query is not None:  # p2c[i, j] = K_j . Q_r[index[i, j]]: gathered along the keys' rows, then transposed
        p2c_table = torch.matmul(key * scale, pos_query.transpose(-1, -2))  # [B, H, Nk, R]
        index_t = index.transpose(0, 1).expand(batch, heads, key_length, query_length)
        scores = scores + torch.gather(p2c_table, -1, index_t).transpose(-1, -2)
    return scores


def eager_attention(query, key, value, pos_key, pos_query, relative, mask, scale, dropout, training):
    """Reference path, the scores as the paper writes them: softmax(Q_c K_c^T + c2p + p2c, scaled) V, keys masked by
    mask.keys [B, 1, 1, Nk] (True = attend). Returns the context [B, H, Nq, D] and the probabilities
    [B, H, Nq, Nk]."""
    scores = torch.matmul(query * scale, key.transpose(-1, -2))  # c2c [B, H, Nq, Nk]
    position = position_scores(query, key, pos_key, pos_query, relative, scale)
    if position is not None:
        scores = scores + position
    scores = scores.masked_fill(~mask.keys, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value), probs


def sdpa_attention(query, key, value, pos_key, pos_query, relative, mask, scale, dropout, training):
    """torch's scaled_dot_product_attention with the position terms as its additive mask: the position scores built
    once per layer, one SDPA call (on CUDA its memory-efficient kernel: flash takes no bias). On CPU, run eagerly,
    the same values come from attention_cpu.cpu_sdpa_attention (layouts and tiles measured there). No
    probabilities."""
    dropout = dropout if training else 0.0
    if pos_key is None and pos_query is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask.keys, dropout_p=dropout,
                                              scale=scale), None
    if relative.cpu is not None:  # prepared for attention_cpu.py's kernels (see relative_positions)
        return cpu_sdpa_attention(query, key, value, pos_key, pos_query, relative, mask.keys, scale, dropout,
                                  training), None
    bias = position_scores(query, key, pos_key, pos_query, relative, scale)  # [B, H, Nq, Nk]
    bias = bias.masked_fill(~mask.keys, torch.finfo(bias.dtype).min)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scale), None


def flex_with_positions(query, key, value, c2p, p2c, rows, block_mask, scale):
    """FlexAttention with the position terms added inside the kernel: score = q_i . k_j * scale + c2p[i, row] +
    p2c[j, row], row = rows[i - j + Nk - 1], for the pairs block_mask lets through. c2p [B, H, Nq, R] and p2c
    [B, H, Nk, R] may each be None; rows [Nq + Nk - 1] as in RelativePositions. Lengths need not be multiples of
    the block size.

    The score_mod closure is made here, from tensors passed in, so that compiled on its own (_compiled_flex_attention)
    dynamo guards on these arguments only, not on a new Python closure, its cells and ints in every call."""
    from torch.nn.attention.flex_attention import flex_attention  # torch >= 2.5; imported only by this path

    if c2p is None and p2c is None:
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale)
    query_length = c2p.shape[-2] if c2p is not None else rows.shape[0] + 1 - p2c.shape[-2]
    key_length = rows.shape[0] + 1 - query_length

    def add_position_scores(score, batch, head, i, j):  # score = q_i . k_j * scale, for one pair
        # The kernel also visits the padding of the last query and key blocks (masked or dropped afterwards): keep
        # its reads inside the tensors.
        i, j = torch.clamp(i, max=query_length - 1), torch.clamp(j, max=key_length - 1)
        row = rows[i - j + key_length - 1]
        if c2p is not None:
            score = score + c2p[batch, head, i, row]
        return score if p2c is None else score + p2c[batch, head, j, row]

    return flex_attention(query, key, value, score_mod=add_position_scores, block_mask=block_mask, scale=scale)


# FlexAttention's key-block size: a block whose keys are all padding is skipped, one with no padding takes the fast
# unmasked kernel, the rest apply the key mask element by element.
FLEX_BLOCK_SIZE = 128

# Cache entries dynamo may keep for the standalone compiled flex function (its default, 8 per function, is shared by
# everything it guards on). Past the limit torch silently runs FlexAttention unfused, materialising every [N, N]
# score. In a user's eager loop each combination of dtype, grad mode, batch size 1 or more, one key block or more
# (and, on CPU, where shapes are static, every padded length and batch size) is an entry: 2 x 2 x 2 x 2 = 16 on a
# GPU. On CPU a new shape costs a few seconds of compile, far less than the unfused path at long lengths.
FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex_attention(dynamic: bool):
    """flex_with_positions compiled once per process, for calls outside torch.compile (FlexAttention runs unfused,
    materialising every score, unless compiled). Dynamic shapes from the first call on GPU: one graph serves every
    batch size above 1 and every length above one block. Static shapes on CPU, where inductor's flex kernel cannot
    take dynamic shapes (torch 2.13.0: see FLEX_STATIC_ON_CPU). Its own recompile limit: FLEX_RECOMPILE_LIMIT."""
    compiled = torch.compile(flex_with_positions, dynamic=dynamic, backend=FLEX_COMPILE_BACKEND)
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    return torch._dynamo.config.patch(**{name: FLEX_RECOMPILE_LIMIT})(compiled)


FLEX_COMPILE_BACKEND = "inductor"  # tests count compilations with another backend

# Measured with torch 2.13.0 on CPU: torch.compile(flex_attention, dynamic=True) fails to build inductor's CPU kernel
# (CppCompileError: "'cur_kvSplitSize7' was not declared in this scope"), so on CPU every new shape compiles anew
# (a few seconds).
FLEX_STATIC_ON_CPU = True


def padding_block_mask(key_mask, query_length):
    """FlexAttention BlockMask for key padding, built from [B, Nk] per-block counts (no [Nq, Nk] tensor, no host
    read): key blocks with no real token are skipped, blocks with no padding need no mask_mod, the others apply
    the key mask. Every query block sees the same key blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, key_length = key_mask.shape[0], key_mask.shape[-1]
    keys = key_mask.reshape(batch, key_length)
    key_blocks, query_blocks = -(-key_length // FLEX_BLOCK_SIZE), -(-query_length // FLEX_BLOCK_SIZE)
    blocks = F.pad(keys, (0, key_blocks * FLEX_BLOCK_SIZE - key_length)).view(batch, key_blocks, FLEX_BLOCK_SIZE)
    full = blocks.all(-1)  # [B, key blocks]
    partial = blocks.any(-1) & ~full  # (the last block is partial when Nk is no multiple of the block size)
    keys = blocks.flatten(1)  # [B, key blocks * block size]: the kernel also visits the last block's padding

    def counts_and_indices(selected):  # [B, key blocks] -> [B, 1, Q blocks], [B, 1, Q blocks, key blocks] int32
        count = selected.sum(-1, dtype=torch.int32)[:, None, None].expand(batch, 1, query_blocks)
        order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return count.contiguous(), order[:, None, None, :].expand(batch, 1, query_blocks, key_blocks).contiguous()

    def is_real_key(b, h, q_idx, kv_idx):
        return keys[b, kv_idx]

    return BlockMask.from_kv_blocks(*counts_and_indices(partial), *counts_and_indices(full),
                                    BLOCK_SIZE=FLEX_BLOCK_SIZE, mask_mod=is_real_key,
                                    seq_lengths=(query_length, key_length))


def flex_key_blocks(keys, query_length):
    """The padding block mask (padding_block_mask) of keys [B, 1, 1, Nk] for flex_attention_path: on CPU for the
    whole blocks that path runs on (padded keys False, never attended)."""
    if keys.device.type == "cpu":
        keys = F.pad(keys, (0, -keys.shape[-1] % FLEX_BLOCK_SIZE))
        query_length += -query_length % FLEX_BLOCK_SIZE
    return padding_block_mask(keys, query_length)


def flex_attention_path(query, key, value, pos_key, pos_query, relative, mask, scale, dropout, training):
    """Fused path: torch's FlexAttention computes the content scores block by block and adds the position terms
    inside the kernel (score_mod), read from the compact products c2p [B, H, Nq, R] and p2c [B, H, Nk, R]; padding
    is a block mask (mask.flex_blocks, built once per forward by prepare_key_mask). No [Nq, Nk] tensor is built, so
    attention memory grows linearly with N, forward and backward (FlexAttention's backward recomputes the scores and
    returns the products' gradients, since torch 2.6). FlexAttention has no attention dropout, and torch has no FlexAttention backward on CPU: training
    needs attention_probs_dropout_prob=0 and a GPU. Inside torch.compile it joins the caller's graph; outside it runs
    compiled on its own. No probabilities."""
    if training and dropout > 0:
        raise ValueError(
            f"attn_implementation='flex_attention' has no attention dropout, but attention_probs_dropout_prob is "
            f"{dropout}: set it to 0.0 in the config to train with this path, or use 'sdpa' (inference in eval() "
            "mode is unaffected)"
        )
    needs_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for t in (query, key, value, pos_key, pos_query))
    if query.device.type == "cpu" and needs_backward:
        raise NotImplementedError(
            "attn_implementation='flex_attention' cannot train on CPU: torch has no FlexAttention backward there. "
            "Use 'sdpa' (the default) for CPU training, or run under torch.no_grad()/inference_mode()"
        )
    c2p = None if pos_key is None else torch.matmul(query * scale, pos_key.transpose(-1, -2))  # [B, H, Nq, R]
    p2c = None if pos_query is None else torch.matmul(key * scale, pos_query.transpose(-1, -2))  # [B, H, Nk, R]
    query_length, key_length = query.shape[-2], key.shape[-2]
    rows = None if relative is None else relative.rows
    if query.device.type == "cpu":
        # torch 2.13.0's CPU kernel reads past the end of a partial last block (measured: wrong or NaN outputs at
        # lengths that are no multiple of the block size, varying from run to run): run it on whole blocks. The
        # products and rows are padded too, so that the CPU's static-shape compiles depend on the block count only.
        pad_query, pad_key = -query_length % FLEX_BLOCK_SIZE, -key_length % FLEX_BLOCK_SIZE
        query, c2p = (None if t is None else F.pad(t, (0, 0, 0, pad_query)) for t in (query, c2p))
        key, value, p2c = (None if t is None else F.pad(t, (0, 0, 0, pad_key)) for t in (key, value, p2c))
        if rows is not None:  # the padded pairs' distances reach past both ends: they read the end rows
            rows = torch.cat([rows[:1].expand(pad_key), rows, rows[-1:].expand(pad_query)])
    block_mask = mask.flex_blocks if mask.flex_blocks is not None else flex_key_blocks(mask.keys, query_length)
    if torch.compiler.is_compiling():  # the caller's graph takes FlexAttention in
        flex = flex_with_positions
    else:
        flex = _compiled_flex_attention(dynamic=not (query.device.type == "cpu" and FLEX_STATIC_ON_CPU))
    context = flex(query, key, value, c2p, p2c, rows, block_mask, scale)
    return context[:, :, :query_length], None


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

    def project_content(self, hidden_states, query_states, layout=None):
        """Query from query_states (EMD passes a different one), key and value from hidden_states; each [B, H, N, D].
        With a SequenceLayout the states are the real tokens [T, C]: projected there, then laid out on its grid
        ([R, W, C], B = R and N = W below)."""
        grid = (lambda x: x) if layout is None else layout.to_grid
        if not self.fused_projection:
            return (
                self.split_heads(grid(self.query_proj(query_states))),
                self.split_heads(grid(self.key_proj(hidden_states))),
                self.split_heads(grid(self.value_proj(hidden_states))),
            )
        # The module is called (not its weight read), so that adapters wrapping in_proj (LoRA) take part.
        fused = grid(self.in_proj(hidden_states))  # [B, N, 3 * H * D], rows interleaved per head as [q_h, k_h, v_h]
        fused = fused.view(*fused.shape[:-1], self.num_heads, 3, self.head_size)  # [B, N, H, 3, D]
        if query_states is not hidden_states:  # EMD: the query comes from other states
            query = grid(self.in_proj(query_states)).view(*fused.shape)[..., 0, :]
        else:
            query = fused[..., 0, :]
        biases = (self.q_bias.view(self.num_heads, self.head_size), self.v_bias.view(self.num_heads, self.head_size))
        # [B, N, H, D] -> [B, H, N, D]
        return (
            (query + biases[0]).transpose(1, 2),
            fused[..., 1, :].transpose(1, 2),
            (fused[..., 2, :] + biases[1]).transpose(1, 2),
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

    def forward(self, hidden_states, mask: KeyMask | SequenceLayout, relative=None, rel_embeddings=None,
                query_states=None, output_attentions=False):
        """mask: the KeyMask of hidden states [B, N, C]; or, for an unpadded batch, its SequenceLayout (padding.py)
        with hidden states [T, C]: attention then runs on the layout's grid, group by group (the layout holds a
        KeyMask and `relative` a RelativePositions per group), and the context comes back as [T, C]."""
        if query_states is None:
            query_states = hidden_states
        layout = mask if isinstance(mask, SequenceLayout) else None
        query, key, value = self.project_content(hidden_states, query_states, layout)
        if layout is None:
            context, probs = self.attend(query, key, value, mask, relative, rel_embeddings, output_attentions)
        else:
            context = layout.attend_by_group(
                lambda q, k, v, group_mask, rel: self.attend(q, k, v, group_mask, rel, rel_embeddings)[0],
                query, key, value, relative)
            probs = None
        context = context.transpose(1, 2).flatten(2)  # [B, H, N, D] -> [B, N, C]
        if layout is not None:
            context = layout.from_grid(context)  # [R, W, C] -> [T, C]
        return context, probs

    def attend(self, query, key, value, mask: KeyMask, relative, rel_embeddings, output_attentions=False):
        """The position projections and the attention implementation on [B, H, N, D] query / key / value."""
        pos_key = pos_query = None
        if self.pos_att_type:
            pos_key, pos_query = self.project_positions(rel_embeddings, relative)
        implementation = self.config._attn_implementation
        if output_attentions or implementation not in ATTENTION_FUNCTIONS:
            implementation = "eager"
        return ATTENTION_FUNCTIONS[implementation](
            query, key, value, pos_key, pos_query, relative, mask, self.scale, self.attention_dropout,
            self.training
        )
