"""oneDNN-packed weights (tformer.model.packed): the same numbers as nn.Linear, only inside the block,
only without autograd, and a row's result independent of the batch it is in."""

from __future__ import annotations

import asyncio
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from tformer.config import DecodeConfig, preset
from tformer.decoding import generate
from tformer.model import Transformer
from tformer.model.packed import Linear, can_pack, packed_weights
from tformer.serving.batcher import Batcher

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="this torch has no oneDNN")


def small_model(**changes) -> Transformer:
    config = preset("tiny", src_vocab_size=50, tgt_vocab_size=60, share_embeddings=False, **changes)
    return Transformer(config, seed=3).eval()


def packed_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "packed", None) is not None]


@pytest.mark.parametrize("tie_output", [True, False])
def test_packed_forward_equals_the_plain_one_and_packing_ends_with_the_block(tie_output: bool) -> None:
    model = small_model(tie_output=tie_output)
    src = torch.randint(4, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(4, 60, (3, 5), generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict())
    n_linears = sum(isinstance(m, Linear) for m in model.modules())
    with torch.no_grad():
        plain = model(src, tgt)
        with packed_weights(model) as packed:
            assert packed
            assert len(packed_modules(model)) == n_linears + tie_output  # + the tied output projection
            with packed_weights(model) as again:  # nested: the outer block owns the copies
                assert not again
            assert len(packed_modules(model)) == n_linears + tie_output
            ours = model(src, tgt)
    assert not packed_modules(model)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)


def test_packed_weights_are_not_used_with_autograd_on() -> None:
    """Training inside the block still gets gradients for every weight (the packed copy has none)."""
    model = small_model().train()
    src = torch.randint(4, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(4, 60, (2, 4), generator=torch.Generator().manual_seed(1))
    with packed_weights(model):
        model(src, tgt).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it() -> None:
    """Bit for bit: the property that makes decoding with packed weights batch-invariant in its arithmetic."""
    layer = Linear(64, 96)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), packed_weights(layer):
        together = layer(x)
        for rows in (1, 4, 5):
            assert torch.equal(layer(x[:rows]), together[:rows])


def test_packed_products_meet_few_row_counts_and_give_each_rows_own_result() -> None:
    """oneDNN keeps a compiled kernel per row count it meets (two caches of 1,024, ~0.3 MB an entry): rounded
    up, the 300 row counts below are a few dozen, and the padding rows change no row's result."""
    layer = Linear(64, 96)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), packed_weights(layer), torch.profiler.profile(record_shapes=True) as profile:
        together = layer(x)
        for rows in range(1, 301):
            assert torch.equal(layer(x[:rows]), together[:rows])
        assert torch.equal(layer(x[:35].reshape(5, 7, 64)), together[:35].reshape(5, 7, 96))
    met = {e.input_shapes[0][0] for e in profile.events() if e.name == "mkldnn::_linear_pointwise"}
    assert 1 in met and 300 not in met and len(met) <= 56


def test_a_torch_that_cannot_pack_decodes_without_packing(monkeypatch) -> None:
    def failing_pack(weight):
        raise RuntimeError("no oneDNN kernel for this CPU")

    monkeypatch.setattr("tformer.model.packed.pack", failing_pack)
    model = small_model()
    with pytest.warns(UserWarning, match="packing failed"), packed_weights(model) as packed:
        assert not packed and not packed_modules(model)


def test_other_dtypes_are_left_alone() -> None:
    model = small_model().to(torch.bfloat16)
    with packed_weights(model) as packed:
        assert not packed and not packed_modules(model)


def test_generate_packs_for_the_call_and_decodes_as_without_packing(monkeypatch) -> None:
    model = small_model()
    src = torch.randint(4, 50, (4, 6), generator=torch.Generator().manual_seed(5))
    config = DecodeConfig(beam_size=3, max_len_a=1.0, max_len_b=3)
    seen = []
    decode = model.decode

    def watching_decode(*args, **kwargs):
        seen.append(len(packed_modules(model)))
        return decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode", watching_decode)
    ours = generate(model, src, src_pad_mask=None, bos_id=1, eos_id=2, config=config)
    assert seen and all(count > 0 for count in seen) and not packed_modules(model)
    monkeypatch.setattr("tformer.decoding.packed_weights", lambda model: nullcontext(False))  # nn.Linear's own
    reference = generate(model, src, src_pad_mask=None, bos_id=1, eos_id=2, config=config)
    assert [[h.tokens for h in n] for n in ours] == [[h.tokens for h in n] for n in reference]
    for a, b in zip(ours, reference, strict=True):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


def test_the_server_packs_once_for_its_life() -> None:
    model = small_model()
    batcher = Batcher(model, tokenizer=None)

    async def life() -> int:
        await batcher.start()
        during = len(packed_modules(model))
        await batcher.stop()
        return during

    assert asyncio.run(life()) > 0
    assert not packed_modules(model)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_compiled_step_multiplies_with_the_packed_copies(beam_size: int) -> None:
    """torch.compile cannot hold oneDNN's opaque copies: the compiled step's products are
    `tformer::packed_linear`, which finds each weight's packed copy at run time. No MKL product runs (a
    compiled step on the CPU used to multiply with unpacked sgemm, slower than the eager step), and the
    tokens are the eager step's."""
    model = small_model()
    src = torch.randint(4, 50, (2, 5), generator=torch.Generator().manual_seed(6))
    eager = DecodeConfig(beam_size=beam_size, max_len_a=0.0, max_len_b=4, static_step=True)
    compiled = DecodeConfig(beam_size=beam_size, max_len_a=0.0, max_len_b=4, static_step=True, compile_step=True)
    expected = generate(model, src, src_pad_mask=None, bos_id=1, eos_id=2, config=eager)
    generate(model, src, src_pad_mask=None, bos_id=1, eos_id=2, config=compiled)  # compiles, untraced
    with torch.profiler.profile() as profile:
        got = generate(model, src, src_pad_mask=None, bos_id=1, eos_id=2, config=compiled)
    names = [event.name for event in profile.events()]
    steps = 4
    # each step: every decoder Linear but the memory's K|V projections (once per source), and the output's
    linears = sum(isinstance(m, Linear) for m in model.decoder.modules()) - len(model.decoder.layers)
    assert names.count("tformer::packed_linear") >= steps * (linears + 1)
    assert not {"aten::addmm", "aten::mm", "aten::linear"} & set(names)
    assert sum("_linear_pointwise" in name for name in names) >= names.count("tformer::packed_linear")
    assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in expected]


def test_the_packed_linear_operator_uses_a_copy_only_while_a_block_holds_it() -> None:
    """`tformer::packed_linear` is the packed product bit for bit while `packed_weights` holds the weight's
    copy (a nested block leaves it to the outer one), and `F.linear` before and after."""
    layer = Linear(64, 96)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(8))
    operator = torch.ops.tformer.packed_linear
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.equal(operator(x, layer.weight, layer.bias, False), plain)
        with packed_weights(layer):
            packed = layer(x)
            assert not torch.equal(packed, plain)  # oneDNN's sums: other last bits, so the test can tell
            with packed_weights(layer):
                pass
            assert torch.equal(operator(x, layer.weight, layer.bias, False), packed)
            assert torch.equal(operator(x, layer.weight, layer.bias, True), torch.relu(packed))
        assert torch.equal(operator(x, layer.weight, layer.bias, False), plain)
    assert not packed_module_copies()


def test_the_packed_linear_operator_never_uses_a_copy_for_another_weight_at_the_same_address() -> None:
    """A parameter given other numbers inside the block (`.data =`, as `model.to(dtype)` does) freed the
    numbers the registry's key names, and a new weight allocated at their address was multiplied with the
    old weight's packed copy (seen within a few allocations). Each entry now keeps the numbers at its key's
    address alive, so no other tensor can take that address while the entry lives."""
    layer = Linear(64, 96)
    with torch.no_grad(), packed_weights(layer):
        layer.weight.data = torch.zeros(96, 64, dtype=torch.float64)
        assert [weight.data_ptr() for weight, *_ in packed_module_copies().values()] == [
            address for address, *_ in packed_module_copies()
        ]
    assert not packed_module_copies()


def test_a_shared_weight_keeps_its_packed_copy_until_the_last_block_holding_it_ends() -> None:
    """Two models sharing a weight, packed by two threads (two Translators: an ensemble and one of its
    members): the blocks end in any order. The first to end removed the weight's registered copy while the
    other still decoded, whose compiled step then multiplied unpacked (other numbers than its eager step's)."""
    first, second = Linear(64, 96), Linear(64, 96)
    second.weight = first.weight
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(12))
    outer, inner = packed_weights(first), packed_weights(second)
    with torch.no_grad():
        outer.__enter__()
        inner.__enter__()
        packed = second(x)
        outer.__exit__(None, None, None)  # the first block ends while the second still holds the weight
        assert torch.equal(torch.ops.tformer.packed_linear(x, second.weight, second.bias, False), packed)
        inner.__exit__(None, None, None)
    assert not packed_module_copies()


def test_a_compiled_model_under_cpu_autocast_multiplies_in_bfloat16() -> None:
    """Validation of a compiled model in bf16 on the CPU (torch.no_grad under autocast): autocast casts
    `F.linear`'s inputs but knows nothing of `tformer::packed_linear`, so the compiled products must stay
    `F.linear` there; the operator computed them in fp32 and returned fp32 where eager returns bf16."""
    layer = Linear(64, 96)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(9))
    compiled = torch.compile(layer, backend="aot_eager")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
        got = compiled(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


def packed_module_copies() -> dict:
    from tformer.model import packed

    return packed._PACKED_COPIES


def test_the_fused_relu_gives_relu_of_the_product_bit_for_bit() -> None:
    layer = Linear(64, 96)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = torch.relu(layer(x))
        assert torch.equal(layer.forward_relu(x), plain)  # unpacked: F.linear, then F.relu
        with packed_weights(layer):
            assert torch.equal(layer.forward_relu(x), torch.relu(layer(x)))
            assert (layer.forward_relu(x) == 0).any() and (layer.forward_relu(x) > 0).any()


def test_a_packed_feed_forward_runs_no_separate_relu() -> None:
    """Inside the block the ReLU is oneDNN's post-op of fc1's product: no ReLU operator runs, and the
    block's output is the unfused one's."""
    model = small_model()
    feed_forward = model.decoder.layers[0].feed_forward
    x = torch.randn(4, 3, model.config.d_model, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = feed_forward(x)
        with packed_weights(model), torch.profiler.profile() as profile:
            fused = feed_forward(x)
    names = {event.name for event in profile.events()}
    assert "aten::relu" not in names and "aten::clamp_min" not in names
    assert any("_linear_pointwise" in name for name in names)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_packed_forward_keeps_a_feed_forward_activation_other_than_relu(activation: str) -> None:
    """Only ReLU is fused into the packed product: a GELU or SiLU model computes what it computes unpacked."""
    model = small_model(activation=activation)
    src = torch.randint(4, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(4, 60, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(src, tgt)
        with packed_weights(model) as packed:
            assert packed
            ours = model(src, tgt)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
