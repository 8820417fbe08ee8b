"""attn_implementation="flex_attention": the fused path (FlexAttention with the position terms added inside the
kernel from the compact [N, R] products).

On CPU torch compiles FlexAttention for inference only (no backward), so these tests check what can run here: the
forward agrees with `eager` to 1e-5 in fp32 in every layout of relative positions and every position-term variant,
padding included; bf16 stays finite; the model compiles with fullgraph=True; and training asks clearly for what the
path needs (no attention dropout; a GPU). Each new shape compiles FlexAttention once (a few seconds on two cores).
"""

import itertools

import pytest
import torch
from helpers import perturb_parameters, random_batch, tiny_config
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from modeling_deberta_custom import DebertaCustomForMaskedLM, DebertaCustomModel, attention

# Lengths 4 / 40 / 100 in the tiny geometry: one table row per distance, bucketed rows, past max_position (64).
CONFIGS = {
    "v3": ({}, (4, 40, 100)),
    "separate_position_projections": (dict(share_att_key=False), (40,)),
    "c2p_only": (dict(pos_att_type=["c2p"]), (40,)),
    "p2c_only": (dict(pos_att_type=["p2c"]), (40,)),
    "v1_fused_projection": (dict(attention_variant="v1", position_buckets=-1, share_att_key=False,
                                 norm_rel_ebd="none", max_relative_positions=12), (40,)),
    "no_relative_attention": (dict(relative_attention=False, position_biased_input=True,
                                   max_position_embeddings=128), (40,)),
}


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each test compiles its own shapes, so that none reaches dynamo's recompile limit (which would silently fall
    back to FlexAttention's unfused reference and test nothing fused)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def eager_and_flex(model_class=DebertaCustomModel, **overrides):
    torch.manual_seed(0)
    eager = model_class._from_config(tiny_config(**overrides), attn_implementation="eager").eval()
    perturb_parameters(eager, scale=0.1)
    flex = model_class._from_config(tiny_config(**overrides), attn_implementation="flex_attention").eval()
    flex.load_state_dict(eager.state_dict())
    assert flex.config._attn_implementation == "flex_attention"
    return eager, flex


def assert_flex_matches_eager(eager, flex, input_ids, attention_mask=None, output_key="last_hidden_state"):
    with torch.no_grad():
        expected = getattr(eager(input_ids=input_ids, attention_mask=attention_mask), output_key)
        actual = getattr(flex(input_ids=input_ids, attention_mask=attention_mask), output_key)
    if attention_mask is not None and expected.shape[:2] == attention_mask.shape:
        # at real tokens: compiled graphs run padded, eager calls unpadded (zeros at padding)
        real = attention_mask.bool()
        expected, actual = expected[real], actual[real]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_flex_matches_eager(case):
    overrides, lengths = CONFIGS[case]
    eager, flex = eager_and_flex(**overrides)
    for length in lengths:
        input_ids, attention_mask = random_batch(eager.config.vocab_size, batch=3, length=length)
        assert_flex_matches_eager(eager, flex, input_ids, attention_mask)


def test_flex_padding_and_no_mask():
    eager, flex = eager_and_flex()
    input_ids, attention_mask = random_batch(eager.config.vocab_size, batch=3, length=40)
    attention_mask[2] = 0  # a row with no real token attends everywhere, as in the other paths
    assert_flex_matches_eager(eager, flex, input_ids, attention_mask)
    assert_flex_matches_eager(eager, flex, input_ids)


def test_flex_enhanced_mask_decoder():
    """EMD's last layer reads query_states != hidden_states."""
    eager, flex = eager_and_flex(DebertaCustomForMaskedLM, sparse_mlm_logits=False)
    assert eager.config.uses_enhanced_mask_decoder
    input_ids, attention_mask = random_batch(eager.config.vocab_size, batch=2, length=40)
    assert_flex_matches_eager(eager, flex, input_ids, attention_mask, output_key="logits")


def test_flex_bfloat16_stays_close_to_float32():
    eager, flex = eager_and_flex()
    input_ids, attention_mask = random_batch(eager.config.vocab_size, batch=3, length=40)
    with torch.no_grad():
        expected = eager(input_ids, attention_mask).last_hidden_state
        actual = flex.to(torch.bfloat16)(input_ids, attention_mask).last_hidden_state
    assert torch.isfinite(actual).all()
    assert (actual.float() - expected).abs().mean() < 0.05  # bf16 keeps 8 bits of mantissa


def test_flex_compiles_fullgraph():
    """Inside torch.compile the path joins the model's graph: fullgraph=True fails on any graph break."""
    eager, flex = eager_and_flex()
    compiled = torch.compile(flex, fullgraph=True, backend="aot_eager", dynamic=False)
    input_ids, attention_mask = random_batch(eager.config.vocab_size, batch=2, length=40)
    assert_flex_matches_eager(eager, compiled, input_ids, attention_mask)


def test_flex_training_needs_no_attention_dropout():
    torch.manual_seed(0)
    model = DebertaCustomModel._from_config(tiny_config(attention_probs_dropout_prob=0.1),
                                            attn_implementation="flex_attention")
    input_ids, attention_mask = random_batch(model.config.vocab_size, batch=2, length=12)
    with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
        model.train()(input_ids, attention_mask)
    with torch.no_grad():  # eval() switches dropout off: inference runs
        assert torch.isfinite(model.eval()(input_ids, attention_mask).last_hidden_state).all()


def test_flex_training_on_cpu_names_the_alternative():
    model = DebertaCustomModel._from_config(tiny_config(), attn_implementation="flex_attention").train()
    input_ids, attention_mask = random_batch(model.config.vocab_size, batch=2, length=12)
    with pytest.raises(NotImplementedError, match="sdpa"):
        model(input_ids, attention_mask)


def test_set_attn_implementation_switches_to_flex_and_back():
    eager, flex = eager_and_flex()
    input_ids, attention_mask = random_batch(eager.config.vocab_size, batch=2, length=12)
    eager.set_attn_implementation("flex_attention")
    assert_flex_matches_eager(flex, eager, input_ids, attention_mask)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    eager.set_attn_implementation({"": "sdpa"})  # transformers' per-submodule form
    assert eager.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match='Specified `attn_implementation="foo"` is not supported'):
        eager.set_attn_implementation("foo")  # transformers' own wording, which its model tests match


def test_flex_compiles_once_across_lengths_and_batch_sizes():
    """Under torch.compile(dynamic=True) the path (products, score_mod, padding block mask) branches on no shape:
    one graph serves several lengths (across the bucket range and max_position) and batch sizes, so a GPU run does
    not recompile per batch shape nor hit dynamo's recompile limit (which falls back to the unfused kernel). The
    eager backend counts dynamo's frames without code generation (inductor's CPU flex kernel takes no dynamic
    shapes in torch 2.13)."""
    from torch._dynamo.testing import CompileCounter

    eager, flex = eager_and_flex()
    counter = CompileCounter()
    compiled = torch.compile(flex, fullgraph=True, dynamic=True, backend=counter)
    for batch, length in ((2, 12), (3, 40), (2, 100), (4, 130)):
        input_ids, attention_mask = random_batch(eager.config.vocab_size, batch=batch, length=length)
        assert_flex_matches_eager(eager, compiled, input_ids, attention_mask)
    # Two graphs at most: lengths up to 128 fill one block of keys, and dynamo specialises sizes of 1.
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations over 4 shapes"


class LargeAllocations(TorchDispatchMode):
    """Records every operation whose output owns storage of at least `limit` elements (views are not counted)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.found = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() >= self.limit * tensor.element_size():
                self.found.append((str(func), tuple(tensor.shape), tensor.dtype))
        return output


def kernel_stand_in(query, *args, **kwargs):
    return torch.empty_like(query)


@pytest.mark.parametrize("model_class", [DebertaCustomModel, DebertaCustomForMaskedLM])
def test_flex_path_allocates_nothing_quadratic_at_16k(monkeypatch, model_class):
    """What the flex path builds around the kernel (relative rows, products, block mask, EMD) grows linearly with N:
    at N = 16384 on the meta device no operation allocates N * N elements (the [N, N] int64 relative index that the
    other paths gather with was 2 GiB there). FlexAttention's kernel itself is replaced by a stand-in of the same
    output: on a GPU it is fused, and on meta it cannot run."""
    length = 16384
    monkeypatch.setattr(attention, "_compiled_flex_attention", lambda dynamic: kernel_stand_in)
    config = tiny_config(max_position_embeddings=length, sparse_mlm_logits=False)
    with torch.device("meta"):
        model = model_class._from_config(config, attn_implementation="flex_attention").eval()
    input_ids = torch.zeros(2, length, dtype=torch.long, device="meta")
    attention_mask = torch.ones(2, length, dtype=torch.long, device="meta")
    with torch.no_grad(), LargeAllocations(length * length) as allocations:
        output = model(input_ids=input_ids, attention_mask=attention_mask)
    assert output[0].shape[:2] == (2, length)
    assert allocations.found == []
    # The same check sees the eager path's [N, N] tensors (a recorder that sees nothing would pass above).
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), LargeAllocations(length * length) as allocations:
        model(input_ids=input_ids[:1], attention_mask=attention_mask[:1])
    assert allocations.found


def test_flex_on_cpu_gets_no_cpu_layouts():
    """On CPU too, the flex path's relative positions are the per-distance rows only (no [N, N] index for the CPU
    kernels, which flex never calls)."""
    config = tiny_config()
    assert attention.relative_positions(300, 300, config, "cpu").cpu is not None  # sdpa / eager: the CPU layouts
    config._attn_implementation = "flex_attention"
    relative = attention.relative_positions(300, 300, config, "cpu")
    assert relative.cpu is None and relative.rows.shape == (599,) and relative.num_rows == 2 * config.relative_span


@pytest.mark.parametrize(("model_class", "builds"), [(DebertaCustomModel, 1), (DebertaCustomForMaskedLM, 2)])
def test_padding_block_mask_is_built_once_per_forward(monkeypatch, model_class, builds):
    """The encoder builds the FlexAttention block mask once and every layer reads it; the Enhanced Mask Decoder
    builds its own once for all its passes. (Counted with the kernel replaced: what is counted is ours.)"""
    calls = []
    build = attention.padding_block_mask
    monkeypatch.setattr(attention, "padding_block_mask", lambda *args: calls.append(args) or build(*args))
    monkeypatch.setattr(attention, "_compiled_flex_attention", lambda dynamic: kernel_stand_in)
    model = model_class._from_config(tiny_config(num_hidden_layers=4, sparse_mlm_logits=False),
                                     attn_implementation="flex_attention").eval()
    input_ids, attention_mask = random_batch(model.config.vocab_size, batch=2, length=40)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
        assert len(calls) == builds
        model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)  # eager: no block mask
    assert len(calls) == builds + (model_class is DebertaCustomForMaskedLM)  # (the decoder runs flex still)


# A user's eager loop: batch 1 and 2, three lengths (one key block, past max_position, several blocks), eval and
# train mode, fp32 and bf16.
LOOP = list(itertools.product((torch.float32, torch.bfloat16), (False, True), (1, 2), (12, 100, 300)))


@pytest.fixture
def counted_standalone_flex(monkeypatch):
    """The standalone compiled flex function (used outside torch.compile) with a backend that counts dynamo's
    compilations, freshly compiled for the test."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    monkeypatch.setattr(attention, "FLEX_COMPILE_BACKEND", counter)
    attention._compiled_flex_attention.cache_clear()
    counters.clear()
    yield counter
    attention._compiled_flex_attention.cache_clear()


def fell_back_to_unfused():
    """Whether dynamo gave up on a frame at its recompile limit (it then runs FlexAttention unfused)."""
    return [reason for reason in counters["unimplemented"] if "recompile limit" in reason.lower()]


def run_loop(model, loop):
    for dtype, train, batch, length in loop:
        model.to(dtype).train(train)
        input_ids, attention_mask = random_batch(model.config.vocab_size, batch=batch, length=length)
        with torch.no_grad():  # (no FlexAttention backward on CPU: train mode, no gradient)
            model(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("static", [True, False], ids=["cpu_static_shapes", "dynamic_shapes"])
def test_standalone_flex_compiles_a_bounded_number_of_times(monkeypatch, counted_standalone_flex, static):
    """Over a user's eager loop of 24 calls the standalone compiled function compiles at most 8 times and never falls
    back to the unfused kernel. It guards on its tensors only (the score_mod closure is made inside it); CPU pads
    every tensor to whole blocks, so its static shapes change with the block count only; with dynamic shapes (the
    GPU setting) what remains are dtype, batch 1 or more, and one key block or more. Train mode runs without
    gradient here (no FlexAttention backward on CPU), so grad mode, which doubles the count on a GPU, is not seen.
    b69ce70 compiled flex_attention itself with a new closure per call and fell back on this loop."""
    monkeypatch.setattr(attention, "FLEX_STATIC_ON_CPU", static)
    model = DebertaCustomModel._from_config(tiny_config(), attn_implementation="flex_attention")
    run_loop(model, LOOP)
    assert 0 < counted_standalone_flex.frame_count <= 8
    assert not fell_back_to_unfused()


def test_standalone_flex_has_its_own_recompile_limit(monkeypatch, counted_standalone_flex):
    """FLEX_RECOMPILE_LIMIT is what the standalone function runs under (and the fallback check above sees a
    fallback): at a limit of 2, the third shape falls back."""
    assert attention.FLEX_RECOMPILE_LIMIT >= 2 * 2 * 2 * 2  # dtype x grad mode x batch 1 x one key block (GPU)
    monkeypatch.setattr(attention, "FLEX_RECOMPILE_LIMIT", 2)
    model = DebertaCustomModel._from_config(tiny_config(), attn_implementation="flex_attention")
    run_loop(model, [(torch.float32, False, 1, 12), (torch.float32, False, 2, 12), (torch.float32, False, 2, 300)])
    assert counted_standalone_flex.frame_count == 2
    assert fell_back_to_unfused()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
def test_cuda_standalone_flex_compiles_a_bounded_number_of_times_with_training(counted_standalone_flex):
    """The GPU version of the loop above, training with gradients (dynamo's frames counted, kernels unfused): grad
    mode doubles the entries, to at most 16, within FLEX_RECOMPILE_LIMIT."""
    model = DebertaCustomModel._from_config(tiny_config(), attn_implementation="flex_attention").cuda()
    for dtype, train, batch, length in LOOP:
        model.to(dtype).train(train)
        input_ids, attention_mask = (t.cuda() for t in random_batch(model.config.vocab_size, batch=batch,
                                                                     length=length))
        with torch.set_grad_enabled(train):
            output = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if train:
                output.float().square().mean().backward()
    print(f"standalone flex, {len(LOOP)} calls with training: {counted_standalone_flex.frame_count} compilations")
    assert 0 < counted_standalone_flex.frame_count <= 16 <= attention.FLEX_RECOMPILE_LIMIT
    assert not fell_back_to_unfused()


@requires_cuda
def test_cuda_standalone_flex_runs_fused_and_bounded(monkeypatch):
    """With inductor, as users run it: a shorter loop (compiling fused kernels takes a while), counted and checked
    against sdpa in the same dtype."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    monkeypatch.setattr(attention, "FLEX_COMPILE_BACKEND", counter)
    attention._compiled_flex_attention.cache_clear()
    counters.clear()
    torch.manual_seed(0)
    flex = DebertaCustomModel._from_config(tiny_config(), attn_implementation="flex_attention").cuda()
    perturb_parameters(flex, scale=0.1)
    sdpa = DebertaCustomModel._from_config(tiny_config(), attn_implementation="sdpa").cuda()
    sdpa.load_state_dict(flex.state_dict())
    for dtype, train, batch, length in [(torch.bfloat16, False, 1, 100), (torch.bfloat16, False, 2, 300),
                                        (torch.bfloat16, False, 2, 1000), (torch.bfloat16, False, 3, 700),
                                        (torch.bfloat16, True, 2, 300), (torch.bfloat16, True, 4, 1000)]:
        flex.to(dtype).train(train)
        sdpa.to(dtype).train(train)
        input_ids, attention_mask = (t.cuda() for t in random_batch(flex.config.vocab_size, batch=batch,
                                                                     length=length))
        with torch.set_grad_enabled(train):
            actual = flex(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if train:
                actual.float().square().mean().backward()
        with torch.no_grad():
            expected = sdpa(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        real = attention_mask.bool().cuda()
        assert (actual.float() - expected.float())[real].abs().max() < 0.1, (batch, length)
    print(f"standalone flex with inductor, 6 calls: {counter.frame_count} compilations")
    assert 0 < counter.frame_count <= 4, counter.frame_count  # batch 1, eval; batch > 1 eval; train
    assert not fell_back_to_unfused()
    attention._compiled_flex_attention.cache_clear()
