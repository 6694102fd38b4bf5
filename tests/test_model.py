"""Properties the Transformer must have: causality, padding invariance, gradients, capacity, size."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import perturbed

from tformer.config import ConfigError, ModelConfig, config_from_dict, preset
from tformer.model import Transformer, count_parameters, model_flops_per_pair
from tformer.model.embeddings import TokenEmbedding, sinusoidal_table
from tformer.model.size import model_elements


def test_changing_future_target_tokens_leaves_earlier_logits_unchanged(tiny_model: Transformer) -> None:
    src = torch.randint(4, 40, (2, 6))
    tgt = torch.randint(4, 40, (2, 8))
    changed = tgt.clone()
    t = 4
    changed[:, t + 1 :] = torch.randint(4, 40, (2, 8 - t - 1))
    with torch.no_grad():
        before, after = tiny_model(src, tgt), tiny_model(src, changed)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


def test_sentence_alone_equals_sentence_in_padded_batch(tiny_model: Transformer) -> None:
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, 40, (3, 9), generator=generator)
    tgt = torch.randint(4, 40, (3, 7), generator=generator)
    src_lengths, tgt_lengths = [9, 4, 6], [7, 3, 5]
    for row, (s, t) in enumerate(zip(src_lengths, tgt_lengths, strict=True)):
        src[row, s:] = 0
        tgt[row, t:] = 0
    tgt_keep = tgt != 0
    with torch.no_grad():
        batched = tiny_model(src, tgt, tgt_pad_mask=tgt_keep)
        for row, (s, t) in enumerate(zip(src_lengths, tgt_lengths, strict=True)):
            alone = tiny_model(src[row : row + 1, :s], tgt[row : row + 1, :t])
            torch.testing.assert_close(batched[row : row + 1, :t], alone, atol=1e-5, rtol=0)


def test_all_padding_source_gives_finite_logits(tiny_model: Transformer) -> None:
    src = torch.zeros(2, 5, dtype=torch.long)
    src[0, :3] = 7
    with torch.no_grad():
        logits = tiny_model(src, torch.randint(4, 40, (2, 4)))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_gradcheck_in_float64(norm_position: str) -> None:
    config = preset(
        "tiny", src_vocab_size=11, tgt_vocab_size=11, d_model=8, n_heads=2, d_ff=12, norm_position=norm_position
    )
    model = Transformer(config, seed=2).double()
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    tgt = torch.tensor([[1, 4, 5], [1, 6, 0]])
    parameters = [
        model.encoder.layers[0].self_attention.qkv_proj.weight,
        model.decoder.layers[1].cross_attention.q_proj.weight,
    ]

    def loss(*weights: torch.Tensor) -> torch.Tensor:
        state = dict(zip(["a", "b"], weights, strict=True))
        return (
            torch.func.functional_call(
                model,
                {
                    "encoder.layers.0.self_attention.qkv_proj.weight": state["a"],
                    "decoder.layers.1.cross_attention.q_proj.weight": state["b"],
                },
                (src, tgt),
            )
            .square()
            .mean()
        )

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in parameters)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)

    embedded = model.src_embedding(src).detach().requires_grad_(True)

    def encoder_only(x: torch.Tensor) -> torch.Tensor:
        return model.encoder(x, src_pad_mask_BS=src != 0, need_weights=False)[0]

    assert torch.autograd.gradcheck(encoder_only, (embedded,), eps=1e-6, atol=1e-5)


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", src_vocab_size=20, tgt_vocab_size=20, d_model=64, d_ff=128), seed=0)
    src = torch.randint(4, 20, (8, 7))
    tgt_out = torch.cat([src.flip(1), torch.full((8, 1), 2)], dim=1)  # reverse, then eos
    tgt_in = torch.cat([torch.full((8, 1), 1), tgt_out[:, :-1]], dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.02


@pytest.mark.parametrize(("name", "paper_millions"), [("base", 65), ("big", 213)])
def test_paper_parameter_counts(name: str, paper_millions: float) -> None:
    """Paper Table 3 with a 37k joint vocabulary; built on the meta device, so no memory is used."""
    with torch.device("meta"):
        model = Transformer(preset(name, src_vocab_size=37000, tgt_vocab_size=37000))
    assert abs(count_parameters(model) / 1e6 - paper_millions) / paper_millions < 0.05


def test_same_seed_same_weights_regardless_of_global_rng() -> None:
    config = preset("tiny", src_vocab_size=30, tgt_vocab_size=30)
    torch.manual_seed(1)
    first = Transformer(config, seed=5)
    torch.manual_seed(2)
    second = Transformer(config, seed=5)
    third = Transformer(config, seed=6)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.src_embedding.weight, third.src_embedding.weight)


def test_weights_are_fp32_and_the_seeds_whatever_the_default_dtype() -> None:
    """A notebook's torch.set_default_dtype(torch.float64) built a float64 model with other weights for the
    same seed (and a run of it saved float64 checkpoints)."""
    config = preset("tiny", src_vocab_size=30, tgt_vocab_size=30)
    expected = Transformer(config, seed=5).state_dict()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = Transformer(config, seed=5)
    finally:
        torch.set_default_dtype(before)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_initialisation_is_as_documented() -> None:
    config = preset("small", src_vocab_size=1000, tgt_vocab_size=1000)
    model = Transformer(config, seed=0)
    embedding = model.src_embedding.weight
    assert torch.all(embedding[config.pad_id] == 0)
    assert abs(embedding[1:].std().item() - config.d_model**-0.5) < 0.002
    q_block = model.encoder.layers[0].self_attention.qkv_proj.weight[: config.d_model]
    bound = math.sqrt(6 / (2 * config.d_model))  # Xavier uniform for a D x D block
    assert q_block.abs().max() <= bound and q_block.abs().max() > 0.95 * bound
    assert torch.all(model.encoder.layers[0].self_attention.qkv_proj.bias == 0)


def test_sinusoidal_layouts() -> None:
    table = sinusoidal_table(50, 6, "interleaved")
    pos, i = 7, 1
    assert table[pos, 2 * i] == pytest.approx(math.sin(pos / 10000 ** (2 * i / 6)), abs=1e-12)
    assert table[pos, 2 * i + 1] == pytest.approx(math.cos(pos / 10000 ** (2 * i / 6)), abs=1e-12)
    concatenated = sinusoidal_table(50, 6, "concatenated")
    torch.testing.assert_close(concatenated, table[:, [0, 2, 4, 1, 3, 5]], atol=0, rtol=0)


def test_sinusoidal_table_is_the_papers_formula_at_every_position_and_dimension() -> None:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(the same), written out with `math`."""
    n_positions, d_model = 30, 10
    table = sinusoidal_table(n_positions, d_model, "interleaved")
    expected = [
        [(math.sin if dim % 2 == 0 else math.cos)(pos / 10000 ** (2 * (dim // 2) / d_model)) for dim in range(d_model)]
        for pos in range(n_positions)
    ]
    torch.testing.assert_close(table, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_token_embedding_is_the_lookup_times_sqrt_d_model() -> None:
    """Paper section 3.4: "we multiply those weights by sqrt(d_model)"; the padding row is zero."""
    config = preset("tiny", src_vocab_size=20, tgt_vocab_size=20)
    model = Transformer(config, seed=0)
    ids = torch.tensor([[5, 0, 7, 19]])
    weight = model.src_embedding.weight.detach()
    torch.testing.assert_close(model.src_embedding(ids).detach(), weight[ids] * math.sqrt(config.d_model))
    assert torch.all(model.src_embedding(ids)[0, 1] == 0)
    unscaled = Transformer(dataclasses.replace(config, scale_embeddings=False), seed=0)
    torch.testing.assert_close(unscaled.src_embedding(ids).detach(), weight[ids], atol=0, rtol=0)


def test_a_float64_model_has_the_float64_positional_encoding() -> None:
    """The table is built as float32; `.double()` must give the formula's float64 values, not float32's
    cast up (off by ~3e-8), or float64 comparisons with a reference fail for that reason alone."""
    config = preset("tiny", src_vocab_size=20, tgt_vocab_size=20, max_positions=40)
    model = Transformer(config, seed=0).double()
    for positions in (model.encoder.positions, model.decoder.positions):
        assert positions.table_PD.dtype == torch.float64
        assert torch.equal(positions.table_PD, sinusoidal_table(40, config.d_model, config.sinusoidal_layout))
    table = sinusoidal_table(40, config.d_model, config.sinusoidal_layout)
    assert torch.equal(model.float().encoder.positions.table_PD, table.float())


def test_attention_maps_are_returned_not_stored(tiny_model: Transformer) -> None:
    src, tgt = torch.randint(4, 40, (2, 6)), torch.randint(4, 40, (2, 5))
    with torch.no_grad():
        logits, maps = tiny_model(src, tgt, return_attention=True)
        plain = tiny_model(src, tgt)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    n_heads = tiny_model.config.n_heads
    assert [m.shape for m in maps.encoder_self] == [(2, n_heads, 6, 6)] * 2
    assert [m.shape for m in maps.decoder_self] == [(2, n_heads, 5, 5)] * 2
    assert [m.shape for m in maps.cross] == [(2, n_heads, 5, 6)] * 2
    assert torch.all(maps.decoder_self[0].triu(1) == 0)  # masked self-attention never looks ahead
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 4 for m in tiny_model.modules() for v in vars(m).values())


@pytest.mark.parametrize("positional_encoding", ["sinusoidal", "learned"])
def test_cached_decoding_equals_full_forward(tiny_model: Transformer, positional_encoding: str) -> None:
    """The cached steps read the positions after the cached ones, for fixed and learned positions alike."""
    if positional_encoding == "learned":
        config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, positional_encoding="learned")
        tiny_model = perturbed(Transformer(config, seed=1)).eval()
    src = torch.randint(4, 40, (2, 6))
    tgt = torch.randint(4, 40, (2, 7))
    with torch.no_grad():
        memory = tiny_model.encode(src)
        full = tiny_model.decode(tgt, memory=memory, src_pad_mask=src != 0)
        cache = tiny_model.new_cache(batch_size=2, capacity=7, memory=memory)
        first = tiny_model.decode(tgt[:, :3], memory=None, src_pad_mask=src != 0, cache=cache)
        steps = [
            tiny_model.decode(tgt[:, t : t + 1], memory=None, src_pad_mask=src != 0, cache=cache) for t in range(3, 7)
        ]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [dict(norm_position="pre"), dict(positional_encoding="learned"), dict(activation="gelu"), dict(tie_output=False)],
)
def test_variants_run_and_train(overrides: dict) -> None:
    model = Transformer(preset("tiny", src_vocab_size=20, tgt_vocab_size=20, **overrides))
    logits = model(torch.randint(4, 20, (2, 5)), torch.randint(4, 20, (2, 4)))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_strict_config_loading() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) d_modle.*valid keys: src_vocab_size"):
        config_from_dict(ModelConfig, {"d_modle": 5})
    with pytest.raises(ConfigError, match="activation must be one of relu, gelu, silu, swish"):
        config_from_dict(ModelConfig, {"activation": "tanh"})
    with pytest.raises(ConfigError, match="divisible"):
        preset("tiny", n_heads=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    assert config_from_dict(ModelConfig, {"dropout": 0}).dropout == 0.0


@pytest.mark.parametrize(("key", "value"), [("n_heads", 0), ("d_model", -1), ("d_model", 0), ("n_heads", -4)])
def test_a_size_below_one_is_named_before_divisibility(key: str, value: int) -> None:
    """n_heads = 0 was a ZeroDivisionError (a traceback on the command line), d_model = -1 a complaint
    about divisibility (-1 % 8 is 7 in Python): the size itself is what is wrong."""
    with pytest.raises(ConfigError, match=f"^{key} must be positive, got {value}$"):
        preset("tiny", **{key: value})


def test_too_long_input_is_a_clear_error(tiny_model: Transformer) -> None:
    too_long = torch.full((1, tiny_model.config.max_positions + 1), 5)
    with pytest.raises(ValueError, match="exceeds max_positions"):
        tiny_model.encode(too_long)


def test_xavier_bounds_follow_the_fused_mark_not_the_shape() -> None:
    """tiny has d_ff = 2 x d_model, the shape of a fused K|V projection: its feed-forward layer must still
    be initialised as one matrix, and only the fused Q|K|V and K|V projections block by block."""
    config = preset("tiny", src_vocab_size=64, tgt_vocab_size=64, tie_output=False, share_embeddings=False)
    assert config.d_ff == 2 * config.d_model and config.tgt_vocab_size == 2 * config.d_model
    model = Transformer(config, seed=0)
    D = config.d_model

    def bound(rows: int, columns: int) -> float:
        return math.sqrt(6 / (rows + columns))

    for whole in (model.encoder.layers[0].feed_forward.fc1, model.output_projection):
        rows, columns = whole.weight.shape
        assert whole.weight.abs().max() <= bound(rows, columns)
    fused_projections = [
        (model.encoder.layers[0].self_attention.qkv_proj, 3),
        (model.decoder.layers[0].cross_attention.kv_proj, 2),
    ]
    for fused, n in fused_projections:
        blocks = fused.weight.split(D, dim=0)
        assert len(blocks) == n and all(block.abs().max() <= bound(D, D) for block in blocks)
        assert fused.weight.abs().max() > bound(n * D, D)  # initialised block by block, not as one matrix


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(share_embeddings=False, tgt_vocab_size=70, tie_output=False, final_logits_bias=True),
        dict(positional_encoding="learned", norm_position="pre"),
    ],
)
def test_model_elements_counts_what_the_built_model_holds(overrides: dict) -> None:
    config = preset("tiny", **{"src_vocab_size": 50, "tgt_vocab_size": 50, "max_positions": 30, **overrides})
    model = Transformer(config)
    held = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert sum(model_elements(config).values()) == held


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (dict(n_encoder_layers=10**11), "model.n_encoder_layers"),
        (dict(max_positions=10**12), "model.max_positions"),
        (dict(src_vocab_size=10**12, tgt_vocab_size=10**12), "the vocabulary sizes"),
    ],
)
def test_a_model_larger_than_memory_is_refused_before_a_layer_is_built(overrides: dict, named: str) -> None:
    """n_encoder_layers = 10**11 built small layers one by one until the machine's memory was gone."""
    with pytest.raises(ConfigError, match=f"GiB of memory here, most of them for {named} "):
        Transformer(preset("tiny", **{"src_vocab_size": 50, "tgt_vocab_size": 50, **overrides}))


def test_inputs_of_the_wrong_kind_are_refused_by_name(tiny_model: Transformer) -> None:
    """Each of these ended in a traceback from inside torch ("tuple index out of range", "Expected tensor
    for argument #1 'indices' to have one of the following scalar types", "where expected condition to
    be a boolean tensor"), and a target batch of another size was broadcast over the memory and gave
    logits for pairs that do not exist."""
    src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[1, 5, 6]])
    with pytest.raises(
        ValueError, match=r"^src_ids must be a \(batch, length\) tensor, got shape \(4,\) \(one sentence"
    ):
        tiny_model(src[0], tgt[0])
    with pytest.raises(TypeError, match=r"^tgt_ids must hold integer token ids \(torch.long\), got torch.float32"):
        tiny_model(src, tgt.float())
    with pytest.raises(TypeError, match=r"^src_ids must be a torch.Tensor of token ids, got list"):
        tiny_model.encode([[5, 6, 2]])
    with pytest.raises(ValueError, match=r"^src_ids has 1 rows but tgt_ids 2: give one target row per source row"):
        tiny_model(src, tgt.repeat(2, 1))
    with pytest.raises(ValueError, match=r"^src_ids has 2 rows but tgt_ids 1: give one target row per source row"):
        tiny_model(src.repeat(2, 1), tgt)
    with pytest.raises(
        TypeError, match=r"^src_pad_mask must be a bool tensor \(True for real tokens\), got torch.int64"
    ):
        tiny_model.encode(src, src_pad_mask=torch.ones_like(src))
    with pytest.raises(ValueError, match=r"^src_pad_mask shape \(1, 7\) differs from src_ids \(1, 4\)"):
        tiny_model.encode(src, src_pad_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^tgt_pad_mask must be a bool tensor"):
        tiny_model(src, tgt, tgt_pad_mask=torch.ones_like(tgt))
    with pytest.raises(TypeError, match=r"^config must be a ModelConfig \(e.g. tformer.config.preset\('tiny', ...\)\)"):
        Transformer("tiny")
    assert tiny_model(src.int(), tgt.int()).shape == (1, 3, 40)  # int32 ids are ids too
    memory = tiny_model.encode(src)
    for wrong, error, said in (
        (
            memory[..., :-1],
            ValueError,
            r"^memory must be \(batch, source length, d_model=32\), .* got shape \(1, 4, 31\)",
        ),
        (memory[0], ValueError, r"got shape \(4, 32\)"),
        (src, TypeError, r"^memory must be a float tensor, the encoder's output \(model.encode\), got torch.int64"),
    ):
        with pytest.raises(error, match=said):
            tiny_model.decode(tgt, memory=wrong, src_pad_mask=None)


def test_token_embedding_sends_the_padding_row_no_gradient() -> None:
    """The lookup scales by sqrt(d_model) and leaves the pad row's gradient at zero; a real token's row
    gets sqrt(d_model) per occurrence (the gradient of the sum of the embedded vectors)."""
    embedding = TokenEmbedding(6, 4, pad_id=0, scale=True).double()
    torch.nn.init.normal_(embedding.weight)
    ids = torch.tensor([[5, 2, 0, 0], [2, 2, 3, 0]])
    torch.testing.assert_close(embedding(ids), embedding.weight[ids] * 2.0, atol=0, rtol=0)
    embedding(ids).sum().backward()
    expected = torch.tensor([0.0, 0.0, 3.0, 1.0, 0.0, 1.0], dtype=torch.float64)[:, None].expand(6, 4) * 2.0
    torch.testing.assert_close(embedding.weight.grad, expected, atol=0, rtol=0)


def test_tied_output_projection_is_the_target_embedding_transposed() -> None:
    """With separate source and target embeddings, tie_output ties the output to the target one."""
    config = preset("tiny", src_vocab_size=30, tgt_vocab_size=30, share_embeddings=False, tie_output=True)
    model = Transformer(config, seed=2).double().eval()
    hidden = torch.randn(2, 3, config.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.project_output(hidden)
    expected = hidden @ model.separate_tgt_embedding.weight.T
    torch.testing.assert_close(logits, expected, atol=1e-12, rtol=0)


def test_flops_per_pair_are_the_forward_products_torch_counts_three_times_plus_attention() -> None:
    """benchmarks/train.py's MFU divides by model_flops_per_pair, which nothing checked: its weight products
    are the ones torch's FlopCounterMode counts in a forward pass (times 3: forward and backward), and its
    attention adds QK^T and AV, 4·d per query-key pair per layer forward (the causal self-attention half of
    that). S = T here: the formula counts the cross-attention's key and value projections per target token."""
    from torch.utils.flop_counter import FlopCounterMode

    config = preset("tiny", src_vocab_size=50, tgt_vocab_size=60, share_embeddings=False)
    model = Transformer(config).eval()
    S = T = 7
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(4, 50, (1, S)), torch.randint(4, 60, (1, T)))
    d, n_enc, n_dec = config.d_model, config.n_encoder_layers, config.n_decoder_layers
    attention = 3 * (4 * d * S * S * n_enc + 2 * d * T * T * n_dec + 4 * d * S * T * n_dec)
    assert model_flops_per_pair(config, S, T) == 3 * counter.get_total_flops() + attention


@pytest.mark.parametrize("limit", ["cgroup_limit", "address_space_limit"])
def test_a_model_over_a_containers_memory_limit_is_refused_before_it_is_built(monkeypatch, limit: str) -> None:
    """Only the machine's physical memory was checked: in a container limited below it, a model too large
    for the container was built until the kernel killed the process, without a word."""
    from tformer.model import size

    config = preset("tiny", src_vocab_size=1000, tgt_vocab_size=1000, max_positions=64)
    needed = size.FLOAT32_BYTES * sum(model_elements(config).values())
    monkeypatch.setattr(size, "physical_memory", lambda: 1 << 40)
    monkeypatch.setattr(size, "address_space_limit", lambda: None)
    monkeypatch.setattr(size, "cgroup_limit", lambda: None)
    monkeypatch.setattr(size, limit, lambda: needed // 2)
    with pytest.raises(ConfigError, match=r"GiB in float32\), more than the 0.0 GiB of memory here, most of them for"):
        Transformer(config)
    monkeypatch.setattr(size, limit, lambda: needed)
    Transformer(config)
