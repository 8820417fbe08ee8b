"""The attention implementations agree with the eager reference, and the fast path keeps its promises.

- `sdpa` (the default) matches `eager` to 1e-5 in fp32, forward and gradients, on both of its paths: the plain one
  every device but eager CPU takes (one position bias, one SDPA call; run here with the CPU kernels switched off),
  and the CPU one (attention_cpu.py) in every layout it uses: one table row per distance (short sequences),
  bucketed rows laid out by distance, and gathers by table row (long sequences, past the bucket range and past
  max_position), for shared / separate position projections, c2p-only / p2c-only, DeBERTa-v1's fused projection,
  padded batches and the Enhanced Mask Decoder's query_states.
- Its building blocks (`_diagonals`, `relative_positions`) match their definitions, including Nq != Nk.
- Half precision stays finite where an unscaled sum of the position terms would overflow fp16.
- Inference stays on SDPA's flash kernel; training saves no [B, H, N, N] tensor beyond what SDPA itself saves.
- Reentrant gradient checkpointing recomputes the same forward (the kernel depends on device and module.training,
  never on grad mode).
- `torch.compile(fullgraph=True)` traces the model without graph breaks (forward and backward).
"""


import pytest
import torch
from helpers import perturb_parameters, random_batch, tiny_config
from torch.profiler import profile

from modeling_deberta_custom import DebertaCustomForMaskedLM, DebertaCustomModel, attention, attention_cpu
from modeling_deberta_custom.attention import (
    KeyMask,
    eager_attention,
    position_scores,
    relative_position_index,
    relative_positions,
    sdpa_attention,
)
from modeling_deberta_custom.attention_cpu import _diagonals, disentangled_bias, uses_distance_layout

IMPLEMENTATIONS = ["eager", "sdpa"]

# Tiny geometry: buckets 8 (mid 4, 16 table rows), max_position 64. Lengths 4 / 12 / 40 / 100 exercise one row per
# distance, bucketed rows by distance, gathers past the bucket range, and gathers past max_position.
CONFIGS = {
    "v3": {},
    "separate_position_projections": dict(share_att_key=False),
    "c2p_only": dict(pos_att_type=["c2p"]),
    "p2c_only": dict(pos_att_type=["p2c"]),
    "no_buckets": dict(position_buckets=-1, max_relative_positions=12),
    "v1_fused_projection": dict(attention_variant="v1", position_buckets=-1, share_att_key=False,
                                norm_rel_ebd="none", max_relative_positions=12),
    "no_relative_attention": dict(relative_attention=False, position_biased_input=True, max_position_embeddings=128),
}
LENGTHS = [1, 4, 12, 40, 100]


def model_pair(model_class=DebertaCustomModel, seed=0, **overrides):
    """The same random weights under each implementation (each model gets a config of its own)."""
    models = {}
    for implementation in IMPLEMENTATIONS:
        torch.manual_seed(seed)
        model = model_class._from_config(tiny_config(**overrides), attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        models[implementation] = model
    perturb_parameters(models["eager"], scale=0.1, seed=seed)
    models["sdpa"].load_state_dict(models["eager"].state_dict())
    return models


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def assert_gradient_close(actual, expected, what):
    """Gradients sum many products, so fp32 rounding grows with their size: compare relative to the largest entry
    (1e-5 of it) rather than entry by entry."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def forward_and_gradients(model, inputs, output_key="last_hidden_state"):
    model.zero_grad(set_to_none=True)
    output = getattr(model(**inputs), output_key)
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    (output * weights).sum().backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return output.detach(), gradients


def compare_paths(models, inputs, output_key="last_hidden_state"):
    expected, expected_gradients = forward_and_gradients(models["eager"], inputs, output_key)
    actual, actual_gradients = forward_and_gradients(models["sdpa"], inputs, output_key)
    assert_close(actual, expected, "output")
    assert actual_gradients.keys() == expected_gradients.keys()
    for name, gradient in expected_gradients.items():
        assert_gradient_close(actual_gradients[name], gradient, f"gradient of {name}")
    # Inference (no autograd) takes SDPA's flash kernel rather than the math fallback: check it too.
    with torch.no_grad():
        assert_close(getattr(models["sdpa"](**inputs), output_key), expected, "output without grad")


def plain_path_everywhere(monkeypatch):
    """Run the path every device but eager CPU takes (GPUs, torch.compile, export) on CPU tensors."""
    monkeypatch.setattr(attention, "cpu_kernels_apply", lambda device: False)


@pytest.mark.parametrize("path", ["cpu", "plain"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_sdpa_matches_eager_forward_and_gradients(monkeypatch, case, length, path):
    if path == "plain":
        plain_path_everywhere(monkeypatch)
    models = model_pair(**CONFIGS[case])
    input_ids, attention_mask = random_batch(models["eager"].config.vocab_size, batch=3, length=length)
    compare_paths(models, dict(input_ids=input_ids, attention_mask=attention_mask))


def test_lengths_exercise_every_layout():
    """The lengths above do reach each way disentangled_bias can lay out the position terms."""
    config = tiny_config()
    layouts = []
    for length in LENGTHS:
        relative = relative_positions(length, length, config, "cpu")
        layouts.append("one row per distance" if relative.cpu.one_row_per_distance
                       else "by distance" if uses_distance_layout(relative, length, length, training=True) else "gather")
    assert layouts == ["one row per distance", "one row per distance", "by distance", "gather", "gather"]
    assert LENGTHS[-1] > config.max_position_embeddings


@pytest.mark.parametrize("length", [12, 40, 100])
def test_tiles_of_heads_and_query_rows(monkeypatch, length):
    """With a tiny tile budget the fast path works through one head at a time and, for inference, through blocks
    of query rows; the result must not change."""
    monkeypatch.setattr(attention_cpu, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(attention_cpu, "MIN_BLOCK_ROWS", 16)
    assert attention_cpu._attention_tiles(3, 4, length, length, 16, training=False)[1] == 16
    models = model_pair()
    input_ids, attention_mask = random_batch(models["eager"].config.vocab_size, batch=3, length=length)
    compare_paths(models, dict(input_ids=input_ids, attention_mask=attention_mask))


@pytest.mark.parametrize("case", ["v3", "c2p_only", "p2c_only", "no_buckets", "v1_fused_projection"])
def test_far_keys_are_broadcast_not_gathered(monkeypatch, case):
    """Inference on a long sequence works through short blocks of query rows; each gathers only the keys within
    the table's reach and broadcasts one row of each term for the keys beyond (_gathered_keys, _far_scores)."""
    monkeypatch.setattr(attention_cpu, "MIN_BLOCK_ROWS", 16)
    length = 200  # the tiny table reaches 63 tokens either way: a 16-row block sees about 140 keys within reach
    relative = relative_positions(length, length, tiny_config(**CONFIGS[case]), "cpu")
    first_block = attention_cpu._gathered_keys(relative.cpu.far, 0, 16, length)
    last_block = attention_cpu._gathered_keys(relative.cpu.far, 180, 196, length)
    assert first_block[0] == 0 and first_block[1] < length, "keys far ahead of the first block are not skipped"
    assert last_block[0] > 0 and last_block[1] == length, "keys far behind the last block are not skipped"
    tiles = attention_cpu._attention_tiles(3, 4, length, length, relative.num_rows, training=False, far=relative.cpu.far)
    assert tiles[1] == 16, "inference does not work through short blocks of query rows"
    assert attention_cpu._attention_tiles(3, 4, length, length, relative.num_rows, training=True,
                                          far=relative.cpu.far)[1] == length  # training keeps whole rows
    models = model_pair(**CONFIGS[case])
    input_ids, attention_mask = random_batch(models["eager"].config.vocab_size, batch=3, length=length)
    compare_paths(models, dict(input_ids=input_ids, attention_mask=attention_mask))


@pytest.mark.parametrize("path", ["cpu", "plain"])
@pytest.mark.parametrize("length", [12, 40])
def test_reentrant_checkpointing_recomputes_the_same_forward(monkeypatch, length, path):
    """Reentrant gradient checkpointing runs each layer's forward without grad and recomputes it with grad for
    backward, from the same RNG state. The kernel depends on the device and module.training only, so both runs draw
    the same attention dropout and the gradients are those of the forward that produced the output: they equal the
    gradients without checkpointing. (A kernel chosen by grad mode would draw its dropout elsewhere.)"""
    if path == "plain":
        plain_path_everywhere(monkeypatch)
    torch.manual_seed(0)
    model = DebertaCustomModel(tiny_config(attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.1)).train()
    input_ids, attention_mask = random_batch(model.config.vocab_size, batch=3, length=length)

    def run(checkpointing, seed=1):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        else:
            model.gradient_checkpointing_disable()
        torch.manual_seed(seed)
        return forward_and_gradients(model, dict(input_ids=input_ids, attention_mask=attention_mask))

    output, gradients = run(checkpointing=False)
    checkpointed_output, checkpointed_gradients = run(checkpointing=True)
    assert_close(checkpointed_output, output, "output under checkpointing")
    assert checkpointed_gradients.keys() == gradients.keys()
    for name, gradient in gradients.items():
        assert_gradient_close(checkpointed_gradients[name], gradient, f"gradient of {name} under checkpointing")
    torch.manual_seed(1)
    with torch.no_grad():  # training mode without grad: the same kernel, the same draws
        assert_close(model(input_ids, attention_mask).last_hidden_state, output, "training output without grad")
    assert not torch.allclose(run(checkpointing=False, seed=2)[0], output), "dropout is off"


def test_fully_padded_row_and_no_mask():
    models = model_pair()
    input_ids, attention_mask = random_batch(models["eager"].config.vocab_size, batch=3, length=40)
    attention_mask[2] = 0  # a row with no real token attends everywhere rather than nowhere
    compare_paths(models, dict(input_ids=input_ids, attention_mask=attention_mask))
    compare_paths(models, dict(input_ids=input_ids))


@pytest.mark.parametrize("length", [4, 12, 40])
def test_enhanced_mask_decoder_query_states(length):
    """EMD runs the last layer with query_states != hidden_states; the MLM logits must agree."""
    models = model_pair(DebertaCustomForMaskedLM, sparse_mlm_logits=False)
    assert models["eager"].config.uses_enhanced_mask_decoder
    input_ids, attention_mask = random_batch(models["eager"].config.vocab_size, batch=2, length=length)
    compare_paths(models, dict(input_ids=input_ids, attention_mask=attention_mask), output_key="logits")


def test_output_attentions_uses_the_eager_probabilities():
    models = model_pair()
    input_ids, attention_mask = random_batch(models["eager"].config.vocab_size, batch=3, length=12)
    with torch.no_grad():
        expected = models["eager"](input_ids, attention_mask, output_attentions=True)
        actual = models["sdpa"](input_ids, attention_mask, output_attentions=True)
    assert len(actual.attentions) == models["sdpa"].config.num_hidden_layers
    for probs, reference in zip(actual.attentions, expected.attentions, strict=True):
        assert_close(probs, reference, "attention probabilities")
    padded = attention_mask[1] == 0
    assert actual.attentions[0][1][..., padded].abs().max() == 0  # padding gets no attention


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (1, 4), (4, 1), (3, 5), (5, 3), (6, 6), (4, 9)])
def test_diagonals_is_a_strided_view(rows, columns):
    length = rows + columns - 1
    table = torch.randn(2, 3, rows, length)
    view = _diagonals(table, columns)
    assert view.shape == (2, 3, rows, columns)
    assert view.data_ptr() >= table.data_ptr() and view.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
    for m in range(rows):
        for k in range(columns):
            assert torch.equal(view[..., m, k], table[..., m, k - m + rows - 1])


@pytest.mark.parametrize(("query_length", "key_length"), [(4, 4), (3, 5), (5, 2), (12, 12), (9, 14), (40, 40),
                                                          (30, 70), (100, 100)])
@pytest.mark.parametrize("case", ["v3", "no_buckets"])
def test_relative_positions_match_the_pair_index(case, query_length, key_length):
    config = tiny_config(**CONFIGS[case])
    relative = relative_positions(query_length, key_length, config, "cpu")
    expected = relative_position_index(query_length, key_length, config, "cpu")  # rows of the full 2S table
    distances = torch.arange(query_length)[:, None] - torch.arange(key_length)[None, :]
    assert torch.equal(relative.rows[distances + key_length - 1] + relative.first_row, expected)
    assert relative.first_row >= 0 and relative.first_row + relative.num_rows <= 2 * config.relative_span
    if relative.cpu.one_row_per_distance:
        assert torch.equal(relative.rows, torch.arange(relative.num_rows))
        assert relative.cpu.index is None
    else:
        assert torch.equal(relative.cpu.index, expected)
        assert torch.equal(relative.cpu.flat_index, expected * key_length + torch.arange(key_length))
    if relative.cpu.far is not None:  # the distances at both ends that share one row, and only those
        far, rows = relative.cpu.far, relative.rows.tolist()
        row_of = {d: rows[d + key_length - 1] for d in range(-(key_length - 1), query_length)}
        assert {row_of[d] for d in row_of if d <= far.low} == {far.low_row}
        assert {row_of[d] for d in row_of if d >= far.high} == {far.high_row}
        assert far.low + 1 not in row_of or row_of[far.low + 1] != far.low_row
        assert far.high - 1 not in row_of or row_of[far.high - 1] != far.high_row


@pytest.mark.parametrize("path", ["cpu", "plain"])
@pytest.mark.parametrize(("query_length", "key_length"), [(3, 5), (5, 2), (9, 14), (30, 70), (70, 30)])
@pytest.mark.parametrize("terms", [["c2p", "p2c"], ["c2p"], ["p2c"]])
def test_fast_attention_function_with_unequal_lengths(monkeypatch, query_length, key_length, terms, path):
    """sdpa_attention against eager_attention directly, Nq != Nk, a masked key in every batch entry."""
    if path == "plain":
        plain_path_everywhere(monkeypatch)
    config = tiny_config()
    generator = torch.Generator().manual_seed(0)
    batch, heads, head_size = 2, 3, 8
    relative = relative_positions(query_length, key_length, config, "cpu")
    query = torch.randn(batch, heads, query_length, head_size, generator=generator)
    key, value = (torch.randn(batch, heads, key_length, head_size, generator=generator) for _ in range(2))
    pos_key, pos_query = (torch.randn(heads, relative.num_rows, head_size, generator=generator) for _ in range(2))
    pos_key = pos_key if "c2p" in terms else None
    pos_query = pos_query if "p2c" in terms else None
    key_mask = torch.ones(batch, 1, 1, key_length, dtype=torch.bool)
    key_mask[0, ..., -1] = key_mask[1, ..., 0] = False
    args = (query, key, value, pos_key, pos_query, relative, KeyMask(key_mask), 0.2, 0.0, False)
    expected, probs = eager_attention(*args)
    actual, _ = sdpa_attention(*args)
    assert_close(actual, expected, "context")
    if path == "plain":  # the plain path's bias: the reference's position terms
        bias = position_scores(query, key, pos_key, pos_query, relative, 0.2)
        bias = bias.masked_fill(~key_mask, torch.finfo(bias.dtype).min)
    else:
        bias = disentangled_bias(query, key, pos_key, pos_query, relative, key_mask, 0.2)
    assert bias.shape == (batch, heads, query_length, key_length)
    assert bool((bias[0, ..., -1] < -1e30).all()) and bool((bias[1, ..., 0] < -1e30).all())
    assert probs[0, ..., -1].abs().max() == 0


# ----------------------------------------------------------------------------------------------------------------------
# Half precision
# ----------------------------------------------------------------------------------------------------------------------


def scale_attention_weights(model, factor):
    with torch.no_grad():
        for layer in model.encoder.layer:
            for projection in (layer.attention.self.query_proj, layer.attention.self.key_proj):
                projection.weight.mul_(factor)
                projection.bias.mul_(factor)


def largest_position_term(model, input_ids):
    """max |c2p| + max |p2c| before scaling, in fp32, for the first layer."""
    encoder = model.deberta.encoder if hasattr(model, "deberta") else model.encoder
    attention = encoder.layer[0].attention.self
    hidden = model.embeddings(input_ids, None, torch.arange(input_ids.shape[1])[None], None,
                              torch.ones_like(input_ids, dtype=torch.bool))
    relative = encoder.relative_index(input_ids.shape[1], input_ids.device)
    query, key, _ = attention.project_content(hidden, hidden)
    pos_key, pos_query = attention.project_positions(encoder.relative_embeddings(), relative)
    return ((query @ pos_key.transpose(-1, -2)).abs().max() + (key @ pos_query.transpose(-1, -2)).abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_half_precision_stays_finite_with_large_position_scores(dtype, implementation):
    torch.manual_seed(0)
    model = DebertaCustomModel._from_config(tiny_config(), attn_implementation=implementation)
    perturb_parameters(model, scale=0.05)
    input_ids, attention_mask = random_batch(model.config.vocab_size, batch=3, length=40)
    with torch.no_grad():
        # Position scores scale with the square of the query/key weights: aim at 1.5x fp16's largest value, which
        # an unscaled sum overflows and the scaled terms (1 / sqrt(3 * 8)) do not.
        factor = (1.5 * torch.finfo(torch.float16).max / largest_position_term(model, input_ids)) ** 0.5
        scale_attention_weights(model, factor)
        assert largest_position_term(model, input_ids) > torch.finfo(torch.float16).max
        expected = model(input_ids, attention_mask).last_hidden_state
    model = model.to(dtype)
    output = model(input_ids, attention_mask).last_hidden_state
    assert torch.isfinite(output).all()
    output.float().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    # Saturated softmaxes amplify rounding, so only a loose agreement with fp32 is expected.
    assert (output.float() - expected).abs().mean() < 0.1


# ----------------------------------------------------------------------------------------------------------------------
# Kernels and memory
# ----------------------------------------------------------------------------------------------------------------------


def test_inference_stays_on_the_flash_kernel():
    model = DebertaCustomModel(tiny_config()).eval()
    input_ids, attention_mask = random_batch(model.config.vocab_size, batch=2, length=40)
    with torch.no_grad(), profile() as prof:
        model(input_ids, attention_mask)
    names = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names


def saved_bytes(function):
    """Bytes of distinct storages autograd saves for backward while running function()."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return storages


@pytest.mark.parametrize("length", [12, 40])
def test_training_saves_no_square_tensor_beyond_sdpa(length):
    """The position terms add no [B, H, N, N] tensor to what SDPA (math path: dropout or a bias with grad) saves for
    backward. By distance (length 12 here) the products keep only their operands ([N, D] views of the projections,
    [H, D, W] tables); gathering (length 40: more distances than DISTANCE_LAYOUT_MAX_RATIO_TRAINING allows) also
    keeps the [N, R] products, as torch.gather saves its input."""
    config = tiny_config()
    generator = torch.Generator().manual_seed(0)
    batch, heads, head_size = 32, 8, 8  # batch-independent tables ([H, D, W]) then weigh little against B * N * N
    relative = relative_positions(length, length, config, "cpu")

    def projection():  # [B, H, N, D] as the attention layer sees it: a view of a [B, N, H * D] projection
        hidden = torch.randn(batch, length, heads, head_size, generator=generator, requires_grad=True)
        return hidden.transpose(1, 2)

    inputs = [projection() for _ in range(3)]
    tables = [torch.randn(heads, relative.num_rows, head_size, generator=generator, requires_grad=True)
              for _ in range(2)]
    key_mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    opaque_bias = torch.randn(batch, heads, length, length, generator=generator, requires_grad=True)
    known = {t.untyped_storage().data_ptr() for t in (*inputs, *tables, opaque_bias)}
    baseline = saved_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(
        *inputs, attn_mask=opaque_bias, dropout_p=0.1))
    ours = {ptr: size for ptr, size in saved_bytes(lambda: sdpa_attention(
        *inputs, *tables, relative, KeyMask(key_mask), 0.2, 0.1, True)).items() if ptr not in known}
    square = batch * heads * length * length * 4
    extra = sum(ours.values()) - sum(baseline.values())
    assert max(ours.values()) <= square, f"saves a tensor of {max(ours.values())} bytes ([B, H, N, N] is {square})"
    if uses_distance_layout(relative, length, length, training=True):
        assert extra < square / 4, f"saves {extra} bytes more than SDPA alone ([B, H, N, N] is {square})"
    else:
        assert extra < 2 * square, f"saves {extra} bytes more than SDPA alone ([B, H, N, N] is {square})"


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------------


def test_compile_fullgraph_forward_and_backward():
    """Dynamo captures the whole model in one graph (fullgraph=True: a graph break is an error) and AOTAutograd
    traces forward and backward, for each layout of the position terms (one graph per length: static shapes keep
    tracing to a few seconds; dynamic lengths compile too, at about three times the cost). backend="aot_eager"
    skips code generation, which takes about a minute on two cores (see the slow test below)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    # Compiled graphs take the padded path (unpadding reads sizes on the host); the loss below reads padding
    # positions too, so the eager reference runs padded as well.
    model = DebertaCustomModel(tiny_config(unpad_inputs=False))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    for length in (4, 12, 40):
        input_ids, attention_mask = random_batch(model.config.vocab_size, batch=2, length=length)
        expected, expected_gradients = forward_and_gradients(model, dict(input_ids=input_ids,
                                                                         attention_mask=attention_mask))
        actual, actual_gradients = forward_and_gradients(compiled, dict(input_ids=input_ids,
                                                                        attention_mask=attention_mask))
        assert_close(actual, expected, f"compiled output at length {length}")
        for name, gradient in expected_gradients.items():
            assert_gradient_close(actual_gradients["_orig_mod." + name], gradient, f"compiled gradient of {name}")


@pytest.mark.slow  # inductor code generation: 20-60 s on 2 cores
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    model = DebertaCustomModel(tiny_config()).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for length in (12, 40):
        input_ids, attention_mask = random_batch(model.config.vocab_size, batch=2, length=length)
        real = attention_mask.bool()  # compiled graphs run padded, eager calls unpadded (zeros at padding)
        with torch.no_grad():
            assert_close(compiled(input_ids, attention_mask).last_hidden_state[real],
                         model(input_ids, attention_mask).last_hidden_state[real], f"inductor output at length {length}")


def test_compiled_training_step_compiles_once_across_lengths():
    """A classifier training step under torch.compile(fullgraph=True, dynamic=True) makes one graph for lengths on
    both sides of the bucket range (4) and of max_position (64): relative positions and the attention path branch
    on no length while compiling (issue 10: it was one graph per layout). Dynamo's frame count is what compiling
    costs; the eager backend skips AOT tracing, which does not change how many frames dynamo compiles."""
    from torch._dynamo.testing import CompileCounter

    from modeling_deberta_custom import DebertaCustomForSequenceClassification

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DebertaCustomForSequenceClassification(tiny_config(num_labels=3)).train()
    counter = CompileCounter()

    def loss_of(input_ids, attention_mask, labels):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    compiled = torch.compile(loss_of, fullgraph=True, dynamic=True, backend=counter)
    for length in (4, 12, 40, 70, 100):
        input_ids, attention_mask = random_batch(model.config.vocab_size, batch=2, length=length)
        compiled(input_ids, attention_mask, torch.tensor([0, 2])).backward()
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations over 5 lengths"
    torch._dynamo.reset()


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-kernels", "off-cpu-path"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_pair_index_is_built_once_per_forward(monkeypatch, implementation, cpu_kernels):
    """The [N, N] relative index is built once per forward and shared by every layer (not rebuilt in each layer's
    position_scores). cpu_kernels=False runs the path every accelerator takes. Length 100: past the one-row-per-distance
    layout, so the index is needed."""
    calls = []
    build = attention.pair_index
    monkeypatch.setattr(attention, "pair_index", lambda *args: calls.append(args[1:]) or build(*args))
    if not cpu_kernels:
        monkeypatch.setattr(attention, "cpu_kernels_apply", lambda device: False)
    model = DebertaCustomModel._from_config(tiny_config(num_hidden_layers=4, unpad_inputs=False),
                                            attn_implementation=implementation).eval()
    input_ids, attention_mask = random_batch(model.config.vocab_size, batch=2, length=100)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    assert calls == [(100, 100)]
