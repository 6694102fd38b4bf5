"""The three forms of scaled dot-product attention agree with each other and with torch's own."""

from __future__ import annotations

import pytest
import torch

from tformer.model import CrossAttention, SelfAttention, attention_fused, attention_loop, attention_matrix
from tformer.model.attention import attend, attention_loop_steps
from tformer.model.masks import additive_mask, causal_mask, key_mask

B, H, T, S, K = 2, 3, 5, 7, 4


def random_qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=generator, dtype=torch.float64)
    k = torch.randn(B, H, S, K, generator=generator, dtype=torch.float64)
    v = torch.randn(B, H, S, K, generator=generator, dtype=torch.float64)
    return q, k, v


def padding(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


MASKS = {
    "none": None,
    "padding": key_mask(padding([7, 4], S)),
    "causal": causal_mask(T, S),  # queries are the last T of S positions
    "padding_and_causal": key_mask(padding([7, 4], S)) & causal_mask(T, S),
}


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_three_forms_agree_in_float64(mask_name: str) -> None:
    q, k, v = random_qkv()
    mask = MASKS[mask_name]
    loop = attention_loop(q, k, v, mask)
    matrix, weights = attention_matrix(q, k, v, mask)
    fused = attention_fused(q, k, v, mask)
    torch.testing.assert_close(loop, matrix, atol=1e-10, rtol=0)
    loop_scores, loop_weights, _ = attention_loop_steps(q, k, v, mask)
    torch.testing.assert_close(loop_weights, weights, atol=1e-12, rtol=0)
    expected_scores = q @ k.transpose(-2, -1) / K**0.5
    real = torch.ones_like(loop_scores, dtype=torch.bool) if mask is None else mask.expand_as(loop_scores)
    torch.testing.assert_close(loop_scores[real], expected_scores[real], atol=1e-12, rtol=0)
    torch.testing.assert_close(fused, matrix, atol=1e-10, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T, dtype=torch.float64), atol=1e-12, rtol=0)
    if mask is not None:
        assert torch.all(weights.masked_select(~mask.expand_as(weights)) == 0)


def test_attention_on_numbers_worked_by_hand() -> None:
    """One query, two keys, d_k = 4 (so sqrt(d_k) = 2):
    q = (1, 1, 0, 0), k0 = (0, 0, 0, 0), k1 = (2 ln 3, 0, 0, 0): scores q·k / 2 = 0 and ln 3;
    softmax: e^0 : e^(ln 3) = 1 : 3, so weights 1/4 and 3/4; values v0 = (4, 0, 0, 0), v1 = (0, 4, 0, 0):
    output 1/4 v0 + 3/4 v1 = (1, 3, 0, 0). With key 1 masked, all the weight goes to key 0: v0."""
    ln3 = torch.log(torch.tensor(3.0, dtype=torch.float64))
    q = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]], dtype=torch.float64)  # 1 1 1 4
    k = torch.tensor([[[[0.0, 0.0, 0.0, 0.0], [2 * ln3, 0.0, 0.0, 0.0]]]], dtype=torch.float64)  # 1 1 2 4
    v = torch.tensor([[[[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]]]], dtype=torch.float64)
    scores, weights, loop = attention_loop_steps(q, k, v)
    torch.testing.assert_close(scores[0, 0, 0], torch.stack([torch.zeros((), dtype=torch.float64), ln3]))
    torch.testing.assert_close(weights[0, 0, 0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    expected = torch.tensor([1.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    matrix, matrix_weights = attention_matrix(q, k, v)
    for output in (loop, matrix, attention_fused(q, k, v)):
        torch.testing.assert_close(output[0, 0, 0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(matrix_weights, weights, atol=1e-12, rtol=0)
    only_key_0 = torch.tensor([True, False])[None, None, None, :]
    for output in (attention_loop(q, k, v, only_key_0), attention_fused(q, k, v, only_key_0)):
        torch.testing.assert_close(output[0, 0, 0], v[0, 0, 0], atol=1e-12, rtol=0)


def test_causal_flag_equals_explicit_causal_mask() -> None:
    q, k, v = random_qkv()
    k, v = k[:, :, :T], v[:, :, :T]
    flagged = attention_fused(q, k, v, is_causal=True)
    explicit, _ = attention_matrix(q, k, v, causal_mask(T))
    torch.testing.assert_close(flagged, explicit, atol=1e-10, rtol=0)


@pytest.mark.parametrize("need_weights", [False, True])
def test_attend_refuses_a_mask_beside_is_causal(need_weights: bool) -> None:
    """The matrix form (weights wanted) put the causal mask in place of the one passed, silently; the fused
    kernel refuses both. Either way now: one clear error."""
    q, k, v = random_qkv()
    k, v = k[:, :, :T], v[:, :, :T]
    with pytest.raises(ValueError, match="a mask or is_causal, not both"):
        attend(q, k, v, key_mask(padding([5, 3], T)), dropout_p=0.0, need_weights=need_weights, is_causal=True)


def test_fully_masked_row_stays_finite() -> None:
    q, k, v = random_qkv()
    mask = torch.zeros(1, 1, T, S, dtype=torch.bool)
    mask[..., 1:, :3] = True  # query 0 may attend to nothing
    for output in (attention_loop(q, k, v, mask), attention_matrix(q, k, v, mask)[0], attention_fused(q, k, v, mask)):
        assert torch.isfinite(output).all()
    for dtype in (torch.float32, torch.bfloat16):
        q32, k32, v32 = (x.to(dtype) for x in (q, k, v))
        assert torch.isfinite(attention_fused(q32, k32, v32, mask)).all()


def test_additive_mask_polarity() -> None:
    mask = torch.tensor([True, False])
    bias = additive_mask(mask, torch.float32)
    assert bias[0] == 0 and bias[1] == torch.finfo(torch.float32).min


def test_a_mask_that_is_not_bool_is_refused_saying_how_to_convert_an_additive_one() -> None:
    """A float mask (the additive kind torch's nn.MultiheadAttention takes) or an int one failed inside
    torch's where, in every form; keys and values of different lengths were weighed in part by the loop."""
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    additive = torch.zeros(3, 5).masked_fill(torch.rand(3, 5) > 0.5, float("-inf"))
    for form in (attention_loop, attention_fused, lambda *a: attention_matrix(*a)[0]):
        for mask in (additive, torch.ones(3, 5, dtype=torch.long)):
            with pytest.raises(TypeError, match=r"^an attention mask is a bool tensor, .* converts with `mask == 0`"):
                form(q, k, v, mask)
    torch.testing.assert_close(attention_loop(q, k, v, additive == 0), attention_fused(q, k, v, additive == 0))
    with pytest.raises(ValueError, match=r"^keys \(1, 2, 5, 4\) must have the queries' head dim 4 and as many"):
        attention_loop(q, k, torch.randn(1, 2, 6, 4))
    with pytest.raises(ValueError, match=r"head dim 4"):
        attention_loop(q, torch.randn(1, 2, 5, 3), v)


def torch_mha(d_model: int, n_heads: int) -> torch.nn.MultiheadAttention:
    return torch.nn.MultiheadAttention(d_model, n_heads, batch_first=True, dtype=torch.float64).eval()


def test_self_attention_matches_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    d_model, n_heads = 12, 3
    ours = SelfAttention(d_model, n_heads, dropout=0.0).double().eval()
    reference = torch_mha(d_model, n_heads)
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.qkv_proj.weight)
        reference.in_proj_bias.copy_(ours.qkv_proj.bias)
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 6, d_model, dtype=torch.float64)
    keep = padding([6, 3], 6)
    expected, expected_weights = reference(x, x, x, key_padding_mask=~keep, average_attn_weights=False)
    fused, _ = ours(x, mask=key_mask(keep))
    matrix, weights = ours(x, mask=key_mask(keep), need_weights=True)
    torch.testing.assert_close(fused, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(matrix, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(weights, expected_weights, atol=1e-10, rtol=0)

    causal_expected, _ = reference(x, x, x, attn_mask=~causal_mask(6)[0, 0])
    causal_ours, _ = ours(x, mask=None, is_causal=True)
    torch.testing.assert_close(causal_ours, causal_expected, atol=1e-10, rtol=0)


def test_cross_attention_matches_torch_multihead_attention() -> None:
    torch.manual_seed(1)
    d_model, n_heads = 12, 4
    ours = CrossAttention(d_model, n_heads, dropout=0.0).double().eval()
    reference = torch_mha(d_model, n_heads)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 4, d_model, dtype=torch.float64)
    memory = torch.randn(2, 9, d_model, dtype=torch.float64)
    keep = padding([9, 5], 9)
    expected, _ = reference(x, memory, memory, key_padding_mask=~keep)
    ours_out, _ = ours(x, memory_kv=ours.project_memory(memory), mask=key_mask(keep))
    torch.testing.assert_close(ours_out, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("need_weights", [False, True])
def test_rows_sharing_a_memory_row_get_what_rows_with_their_own_copy_get(need_weights: bool) -> None:
    """Beams of one sentence read one memory row (their queries folded into one attention call):
    outputs and weights equal those of every row holding its own copy of the memory (float64)."""
    torch.manual_seed(2)
    d_model, n_heads, beams = 12, 4, 3
    attention = CrossAttention(d_model, n_heads, dropout=0.0).double().eval()
    memory = torch.randn(2, 9, d_model, dtype=torch.float64)
    keep = padding([9, 5], 9)
    x = torch.randn(2 * beams, 2, d_model, dtype=torch.float64)
    shared = attention(x, memory_kv=attention.project_memory(memory), mask=key_mask(keep), need_weights=need_weights)
    own = attention(
        x,
        memory_kv=attention.project_memory(memory.repeat_interleave(beams, dim=0)),
        mask=key_mask(keep.repeat_interleave(beams, dim=0)),
        need_weights=need_weights,
    )
    torch.testing.assert_close(shared[0], own[0], atol=1e-12, rtol=0)
    if need_weights:
        assert shared[1].shape == (2 * beams, n_heads, 2, 9)
        torch.testing.assert_close(shared[1], own[1], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="cannot share"):
        attention(x[:5], memory_kv=attention.project_memory(memory), mask=None)


def test_causal_mask_with_cached_keys_lets_each_query_see_itself_and_earlier_keys() -> None:
    """Two new queries after three cached keys are positions 3 and 4 of five: query 3 sees keys 0..3,
    query 4 all five (written out, not derived from the function under test)."""
    expected = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    assert torch.equal(causal_mask(2, 5)[0, 0], expected)
    assert torch.equal(causal_mask(3)[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())


def test_matrix_form_dropout_rescales_the_weights_it_keeps() -> None:
    """Dropout on the attention weights zeroes some and divides the rest by 1 - p (inverted dropout), so
    their expectation is the weights. With V the identity, the output is the dropped weights themselves."""
    q, k, _ = random_qkv()
    v = torch.eye(S, dtype=torch.float64).expand(B, H, S, S)
    p = 0.5
    torch.manual_seed(0)
    dropped, weights = attention_matrix(q, k, v, dropout_p=p)
    kept = dropped != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p), atol=1e-14, rtol=0)


@pytest.mark.parametrize("module", ["self", "cross"])
def test_attention_dropout_acts_in_training_only(module: str) -> None:
    """A module in eval mode ignores its dropout (its output equals the dropout-free module's); in
    training mode the same module's output changes."""
    d_model, n_heads = 12, 4
    make = SelfAttention if module == "self" else CrossAttention
    torch.manual_seed(3)
    plain = make(d_model, n_heads, dropout=0.0).double().eval()
    dropping = make(d_model, n_heads, dropout=0.5).double().eval()
    dropping.load_state_dict(plain.state_dict())
    x = torch.randn(2, 20, d_model, dtype=torch.float64)

    def run(attention: torch.nn.Module, need_weights: bool) -> torch.Tensor:
        if module == "self":
            return attention(x, mask=None, need_weights=need_weights)[0]
        return attention(x, memory_kv=attention.project_memory(x), mask=None, need_weights=need_weights)[0]

    for need_weights in (False, True):  # the fused kernel and the matrix form
        torch.testing.assert_close(run(dropping, need_weights), run(plain, need_weights), atol=1e-12, rtol=0)
    dropping.train()
    for need_weights in (False, True):
        assert not torch.allclose(run(dropping, need_weights), run(plain, need_weights), atol=1e-6)
