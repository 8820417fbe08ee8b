"""attn_implementation="flex_attention": the fused path (FlexAttention with the position terms added inside the
kernel from the compact [N, R] products).

On CPU torch compiles FlexAttention for inference only (no backward), so these tests check what can run here: the
forward agrees with `eager` to 1e-5 in fp32 in every layout of relative positions and every position-term variant,
padding included; bf16 stays finite; the model compiles with fullgraph=True; and training asks clearly for what the
path needs (no attention dropout; a GPU). Each new shape compiles FlexAttention once (a few seconds on two cores).
"""

import pytest
import torch
from conftest import perturb_parameters, random_batch, tiny_config

from modeling_deberta_custom import DebertaCustomForMaskedLM, DebertaCustomModel

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
