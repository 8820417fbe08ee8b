"""Padding-free batches: which tokens of a batch are real, and how its sequences are laid out for attention.

Two kinds of batches reach the model:

- padded: input [B, N] with an attention_mask; each row is one sequence, padded on the left or the right (or with
  holes: a masked place inside a sequence stays a masked key, as in the padded path);
- packed: what transformers' DataCollatorWithFlattening gives, input [1, T] holding several sequences back to back,
  marked by `cu_seq_lens_q` (cumulative lengths), `seq_idx` (a sequence number per token) or `position_ids` that
  restart (a token whose position id is not above the previous token's starts a new sequence).

A `SequenceLayout` describes either kind once per forward. The token-wise layers (embeddings, projections,
feed-forward, LayerNorms, heads) run on the T real tokens, [T, C]; attention runs on a grid [R, W]: R sequences
(padded batches: one per row, empty rows included) of up to W tokens, each sequence in its own grid row starting at
column 0, so that relative positions count within the sequence and no sequence sees another. Moving between the
three layouts is a row gather one way and a row copy into zeros the other (index_select / index_copy: both
deterministic, on accelerators too). On CPU, where the lengths are free to read, the grid rows are sorted by length
and attention runs by groups of rows cut to their own longest sequence (`attention_groups`), so that short
sequences do not pay for the batch's longest.

Host reads: a padded batch's T and W are data-dependent sizes, read on the host once per forward in
`layout_from_attention_mask` (one `.tolist()`: one device sync on accelerators, as flash-attn's and ModernBERT's
unpadding do; free on CPU). Packed batches with cu_seq_lens_q and max_length_q need no read at all (on accelerators;
on CPU their lengths are read, for free); packed batches known only from position_ids or seq_idx need one.

This file is copied with the modeling file as remote code, so it imports only torch.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

# The packing keyword arguments transformers' DataCollatorWithFlattening can add to a batch.
PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class SequenceLayout(NamedTuple):
    """Where the T real tokens of a [B, N] input sit, and the attention grid [R, W] of its R sequences.

    token_index [T]: place of each real token in the flattened input [B * N], row-major (the order of the [T, C]
        token-wise tensors).
    grid_index [T]: place of each token in the flattened grid [R * W]. Each sequence fills a grid row from column 0.
    key_mask [R, 1, 1, W]: True where a grid place holds a token (a row without any token attends to every place, as
        the padded path does, so that softmax stays finite; its outputs are never read).
    row_starts [R]: the token that starts each grid row (T for a row without tokens).
    row_of_sequence [R]: the grid row of each sequence (sequences in input order: the rows of a padded batch, the
        sequences of a packed one in turn). Where the lengths are read on the host (CPU) the grid rows are sorted from
        the longest sequence to the shortest, so that attention can run by groups of similar length.
    groups: ((first row, stop row, width), ...): the grid rows attention runs on, group by group, each cut to its
        longest sequence (rows without tokens are in none); one group of the whole grid where lengths are unknown.
    input_shape (B, N), grid_shape (R, W): Python ints.
    packed: True when the rows hold several sequences (a packed batch): sequence-level heads then answer once per
        sequence, [R, ...], instead of once per row.
    group_masks: what attention reads as the key mask of each group, made once per forward by the encoder
        (with_group_masks); empty until then."""

    token_index: torch.Tensor
    grid_index: torch.Tensor
    key_mask: torch.Tensor
    row_starts: torch.Tensor
    row_of_sequence: torch.Tensor
    groups: tuple
    input_shape: tuple[int, int]
    grid_shape: tuple[int, int]
    packed: bool
    group_masks: tuple = ()

    @property
    def num_tokens(self) -> int:
        return self.token_index.shape[0]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] -> [T, ...] (a [1, N, ...] tensor is read for every row, as broadcasting would)."""
        batch, length = self.input_shape
        return x.expand(batch, length, *x.shape[2:]).reshape(batch * length, *x.shape[2:]).index_select(
            0, self.token_index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, N, ...], zeros at padding."""
        batch, length = self.input_shape
        padded = x.new_zeros(batch * length, *x.shape[1:]).index_copy(0, self.token_index, x)
        return padded.view(batch, length, *x.shape[1:])

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [R, W, ...], zeros where the grid holds no token."""
        rows, width = self.grid_shape
        grid = x.new_zeros(rows * width, *x.shape[1:]).index_copy(0, self.grid_index, x)
        return grid.view(rows, width, *x.shape[1:])

    def from_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[R, W, ...] -> [T, ...]."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.grid_index)

    def unpad_positions(self, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[T] position ids of the real tokens: the given ones ([B, N], [1, N] or [N]), or by default the padded
        path's (the column in the input) for a padded batch, and for a packed one the place within its sequence."""
        if position_ids is not None:
            return self.unpad(position_ids.reshape(-1, self.input_shape[1]))
        if self.packed:
            return torch.remainder(self.grid_index, self.grid_shape[1])
        return torch.remainder(self.token_index, self.input_shape[1])

    def first_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [R, ...]: the first token of each sequence, in input order (zeros for an empty row)."""
        with_zero_row = torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # [T + 1, ...]: index T reads zeros
        return with_zero_row.index_select(0, self.row_starts.index_select(0, self.row_of_sequence))

    def first_token_of_each(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [T, ...]: for every token, the first token of its sequence."""
        row = torch.div(self.grid_index, self.grid_shape[1], rounding_mode="floor")  # [T]
        return x.index_select(0, self.row_starts.index_select(0, row))

    def by_sequence(self, grid: torch.Tensor) -> torch.Tensor:
        """[R, W, ...] grid rows -> [R, W, ...] with row r holding sequence r (input order)."""
        return grid.index_select(0, self.row_of_sequence)

    def with_group_masks(self, make_mask) -> "SequenceLayout":
        """This layout with group_masks: make_mask(keys) for each group's [rows, width] bool key mask."""
        masks = tuple(make_mask(self.key_mask[first:stop, 0, 0, :width]) for first, stop, width in self.groups)
        return self._replace(group_masks=masks)

    def attend_by_group(self, attend, query, key, value, relatives):
        """Attention over the grid, group by group (see `groups`): attend(query, key, value, mask, relative) on
        [rows, H, width, D] slices, with the group's mask (group_masks) and relative positions (`relatives`, one per
        group). query / key / value [R, H, W, D] -> context [R, H, W, D] (zeros past each group's width and in rows
        without tokens)."""
        rows, width = self.grid_shape
        if self.groups == ((0, rows, width),):
            return attend(query, key, value, self.group_masks[0], relatives[0])
        contexts = []
        for (first, stop, group_width), mask, relative in zip(self.groups, self.group_masks, relatives, strict=True):
            part = (slice(first, stop), slice(None), slice(0, group_width))
            context = attend(query[part], key[part], value[part], mask, relative)
            contexts.append(F.pad(context, (0, 0, 0, width - group_width)))  # [rows in group, H, W, D]
        context = torch.cat(contexts)
        missing = rows - context.shape[0]  # rows without tokens, sorted last
        return torch.cat([context, context.new_zeros(missing, *context.shape[1:])]) if missing else context


# Attention by groups (CPU): a group of `rows` grid rows cut to `width` costs about
#     overhead + rows * width * (1 + width / quadratic_scale)
# grid places' worth of work, (overhead, quadratic_scale) as below. Measured for one layer's attention (sdpa) at the
# DeBERTa-v3-base geometry on the 2-core AMD EPYC (torch 2.13.0, one thread, CPU time): in training (forward and
# backward, a kernel per head) ~9 ms per call, ~13 us per grid place, ~0.6 us per pair of places; in inference (one
# fused SDPA call) ~0.3 ms, ~1.9 us and ~0.23 us. Rows are grouped by a dynamic programme over the sorted lengths (up
# to MAX_PLANNED_ROWS rows; beyond it, one group).
TRAINING_GROUP_COSTS = (700, 22)
INFERENCE_GROUP_COSTS = (160, 8)
MAX_PLANNED_ROWS = 256


def attention_groups(lengths: list[int], training: bool = True) -> tuple:
    """Sequence lengths sorted from the longest (zeros last) -> the groups of rows (first, stop, width) of least
    estimated attention cost (see above)."""
    overhead, quadratic_scale = TRAINING_GROUP_COSTS if training else INFERENCE_GROUP_COSTS
    lengths = [n for n in lengths if n > 0]
    count = len(lengths)
    if count == 0:
        return ()
    if count > MAX_PLANNED_ROWS:
        return ((0, count, lengths[0]),)
    best, start = [0.0] + [float("inf")] * count, [0] * (count + 1)
    for stop in range(1, count + 1):
        for first in range(stop):
            width = lengths[first]
            cost = best[first] + overhead + (stop - first) * width * (1 + width / quadratic_scale)
            if cost < best[stop]:
                best[stop], start[stop] = cost, first
    groups, stop = [], count
    while stop > 0:
        groups.append((start[stop], stop, lengths[start[stop]]))
        stop = start[stop]
    return tuple(reversed(groups))


def _layout(token_index, sequences, columns, input_shape, num_rows, width, packed, lengths=None,
            training=True) -> SequenceLayout:
    """The layout of T tokens at `token_index` [T] in the input, token t being at column `columns[t]` of sequence
    `sequences[t]` (sequences numbered in input order). `lengths`: each sequence's width in the grid, read on the
    host, or None (unknown: grid rows in input order, one attention group); `training` picks the group costs."""
    num_tokens, device = token_index.shape[0], token_index.device
    if lengths is None:
        row_of_sequence = torch.arange(num_rows, device=device)
        groups = ((0, num_rows, width),)
    else:
        order = sorted(range(num_rows), key=lambda r: -lengths[r])  # stable: ties keep input order
        rank = [0] * num_rows
        for row, sequence in enumerate(order):
            rank[sequence] = row
        row_of_sequence = torch.tensor(rank, device=device)
        groups = attention_groups([lengths[r] for r in order], training)
    grid_index = row_of_sequence.index_select(0, sequences) * width + columns
    # the token at each grid place, T where there is none
    grid_slot = torch.full((num_rows * width,), num_tokens, dtype=torch.long, device=device)
    grid_slot = grid_slot.index_copy(0, grid_index, torch.arange(num_tokens, device=device)).view(num_rows, width)
    key_mask = grid_slot != num_tokens
    key_mask = key_mask | ~key_mask.any(-1, keepdim=True)
    row_starts = grid_slot[:, 0]  # column 0 of every sequence is its first token
    return SequenceLayout(token_index, grid_index, key_mask[:, None, None, :], row_starts, row_of_sequence, groups,
                          input_shape, (num_rows, width), packed)


def _real_token_index(flat_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B * N] bool -> [T] places of the True entries in order, without boolean indexing (T is already known)."""
    return torch.sort(flat_mask.to(torch.int8), descending=True, stable=True).indices[:num_tokens]


def layout_from_attention_mask(attention_mask: torch.Tensor, group_by_length: bool = False,
                               training: bool = True) -> SequenceLayout | None:
    """The layout of a padded batch [B, N]: grid row b holds the span of row b from its first to its last real token
    (W: the longest span), so that relative positions are exactly the padded path's. None when the batch has no
    padding (the padded path is then the same work) or no real token. One host read: T and W, or with
    group_by_length T and every row's span (for attention by groups of similar length, planned for training or
    inference; free on CPU, where it is used)."""
    mask = attention_mask.bool()
    batch, length = mask.shape
    if mask.numel() == 0:
        return None
    has_token = mask.any(-1)
    first = mask.to(torch.int8).argmax(-1)  # first real column of each row (0 for an empty row)
    last = length - 1 - mask.flip(-1).to(torch.int8).argmax(-1)
    span = torch.where(has_token, last - first + 1, 0)  # [B]
    if group_by_length:
        num_tokens, *spans = torch.cat([mask.sum()[None], span]).tolist()  # the one host read
        width = max(spans)
    else:
        num_tokens, width = torch.stack([mask.sum(), span.max()]).tolist()  # the one host read
        spans = None
    if num_tokens in (0, batch * length):
        return None
    token_index = _real_token_index(mask.flatten(), num_tokens)
    rows = torch.div(token_index, length, rounding_mode="floor")
    columns = token_index - rows * length - first.index_select(0, rows)
    return _layout(token_index, rows, columns, (batch, length), batch, width, packed=False, lengths=spans,
                   training=training)


def _sequence_starts_from_ids(ids: torch.Tensor, mask: torch.Tensor, restart_when_not_above: bool) -> torch.Tensor:
    """[B, N] starts of sequences among the real tokens: a row's first real token, and a real token whose id is not
    above the previous real token's (position ids restarting) or differs from it (sequence ids)."""
    length = mask.shape[-1]
    columns = torch.arange(length, device=mask.device).expand_as(mask)
    # the previous real token's column in the row (-1 before the first one)
    seen = torch.where(mask, columns, -1).cummax(-1).values
    previous = torch.cat([torch.full_like(seen[:, :1], -1), seen[:, :-1]], dim=-1)
    previous_ids = ids.gather(-1, previous.clamp(min=0))
    restart = ids <= previous_ids if restart_when_not_above else ids != previous_ids
    return mask & ((previous < 0) | restart)


def layout_from_sequence_ids(ids: torch.Tensor, attention_mask: torch.Tensor | None, *, position_ids: bool,
                             group_by_length: bool = False, training: bool = True) -> SequenceLayout | None:
    """The layout of a packed batch whose sequences are marked by restarting `position_ids` (position_ids=True) or by
    a sequence number per token (`seq_idx`, position_ids=False); ids [B, N] or [N]. Sequences never span rows; a
    masked place inside a sequence stays a masked key. None for one sequence without padding (nothing to unpad).
    One host read: T, the number of sequences S and W, or with group_by_length every sequence's length."""
    batch, length = ids.shape if ids.dim() == 2 else (1, ids.shape[0])
    if batch * length == 0:
        return None
    ids = ids.reshape(batch, length)
    mask = (torch.ones(batch, length, dtype=torch.bool, device=ids.device) if attention_mask is None
            else attention_mask.bool())
    starts = _sequence_starts_from_ids(ids, mask, restart_when_not_above=position_ids).flatten()  # [B * N]
    places = torch.arange(batch * length, device=ids.device)
    start_place = torch.where(starts, places, 0).cummax(0).values  # each place's latest start, flat
    span = torch.where(mask.flatten(), places - start_place + 1, 0)
    if group_by_length:  # each sequence's span, read where the next sequence starts (or at the end)
        ends = torch.cat([starts[1:], starts.new_ones(1)]) & (span > 0)
        num_tokens, *at_ends = torch.cat([mask.sum()[None], torch.where(ends, span, 0)]).tolist()  # the one read
        lengths = [n for n in at_ends if n > 0]
        num_sequences, width = len(lengths), max(lengths, default=0)
    else:
        num_tokens, num_sequences, width = torch.stack([mask.sum(), starts.sum(), span.max()]).tolist()  # one read
        lengths = None
    if num_tokens == 0 or (num_sequences == 1 and num_tokens == batch * length):
        return None
    token_index = _real_token_index(mask.flatten(), num_tokens)
    sequences = starts.long().cumsum(0).index_select(0, token_index) - 1  # sequence number of each token
    columns = token_index - start_place.index_select(0, token_index)
    return _layout(token_index, sequences, columns, (batch, length), num_sequences, width, packed=True,
                   lengths=lengths, training=training)


def layout_from_cu_seq_lens(cu_seq_lens: torch.Tensor, max_length: int, length: int,
                            group_by_length: bool = False, training: bool = True) -> SequenceLayout:
    """The layout of a packed batch [1, T] from its cumulative sequence lengths [S + 1] (0, l0, l0 + l1, ..., T) and
    the longest length (a Python int, as DataCollatorWithFlattening returns it): no host read (with group_by_length
    the lengths are read: for CPU tensors, where that is free)."""
    device = cu_seq_lens.device
    cu_seq_lens = cu_seq_lens.long()
    tokens = torch.arange(length, device=device)
    sequences = torch.searchsorted(cu_seq_lens[1:], tokens, right=True)  # [T] sequence of each token
    columns = tokens - cu_seq_lens.index_select(0, sequences)
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).tolist() if group_by_length else None
    return _layout(tokens, sequences, columns, (1, length), cu_seq_lens.shape[0] - 1, max(int(max_length), 1),
                   packed=True, lengths=lengths, training=training)


def check_packing_kwargs(kwargs: dict, input_shape, check_values: bool = False) -> None:
    """Unknown keyword arguments are an error (a typo would otherwise be ignored); packing arguments must describe
    one self-attention over a [1, T] input. With check_values (where reading them is free) cu_seq_lens_q must also
    rise from 0 to T and equal cu_seq_lens_k."""
    unknown = sorted(set(kwargs) - set(PACKING_KWARGS))
    if unknown:
        raise TypeError(f"Unexpected keyword arguments {unknown}: besides the usual inputs the model takes only the "
                        f"packing arguments of DataCollatorWithFlattening {list(PACKING_KWARGS)}")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    given = [name for name in PACKING_KWARGS if kwargs.get(name) is not None]
    if given and input_shape[0] != 1:
        raise ValueError(f"Packing arguments {given} describe a packed batch of shape [1, T]; the input is "
                         f"{tuple(input_shape)}")
    if (cu_q is None) != (kwargs.get("max_length_q") is None):
        raise ValueError("Pass cu_seq_lens_q together with max_length_q (DataCollatorWithFlattening's "
                         "return_flash_attn_kwargs=True returns both)")
    if cu_k is not None and (cu_q is None or cu_k.shape != cu_q.shape):
        raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: DeBERTa's attention is self-attention")
    if cu_q is not None and (cu_q.dim() != 1 or cu_q.shape[0] < 2):
        raise ValueError(f"cu_seq_lens_q must be [number of sequences + 1], got shape {tuple(cu_q.shape)}")
    if cu_q is not None and check_values:
        cu_q = cu_q.long()
        if int(cu_q[0]) != 0 or int(cu_q[-1]) != input_shape[-1] or bool((cu_q[1:] <= cu_q[:-1]).any()):
            raise ValueError(f"cu_seq_lens_q must rise from 0 to the {input_shape[-1]} tokens of the input, got "
                             f"{cu_q.tolist()}")
        if cu_k is not None and not torch.equal(cu_k.long(), cu_q):
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: DeBERTa's attention is self-attention")
        if int(kwargs["max_length_q"]) != int((cu_q[1:] - cu_q[:-1]).max()):
            raise ValueError(f"max_length_q={kwargs['max_length_q']} is not the longest sequence of cu_seq_lens_q")
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is not None and seq_idx.shape[-1] != input_shape[-1]:
        raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)} but the input is {tuple(input_shape)}")


__all__ = ["PACKING_KWARGS", "SequenceLayout", "attention_groups", "check_packing_kwargs",
           "layout_from_attention_mask", "layout_from_cu_seq_lens", "layout_from_sequence_ids"]
