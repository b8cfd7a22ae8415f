"""The reference GPT: tying, shapes, parameter and FLOP accounting, determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from fscale.models import GPT, Block, GPTConfig, gpt_loss


def _tiny(**changes):
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(**changes))


def test_tied_head_is_one_parameter():
    model = _tiny()
    assert model.head.weight is model.tok_emb.weight
    names = dict(model.named_parameters(remove_duplicate=False))
    assert names["head.weight"] is names["tok_emb.weight"]
    # Deduplicated iteration (what optimizers and fs.functional see) lists it once.
    assert sum(p is model.tok_emb.weight for p in model.parameters()) == 1


def test_untied_head_is_separate():
    model = _tiny(tie_embeddings=False)
    assert model.head.weight is not model.tok_emb.weight


def test_num_params_counts_tied_weight_once():
    cfg = GPTConfig.tiny()
    tied, untied = GPT(cfg), GPT(cfg.replace(tie_embeddings=False))
    emb = cfg.vocab_size * cfg.d_model
    by_hand = sum(p.numel() for p in tied.state_dict().values()) - emb  # state_dict keeps both
    assert tied.num_params() == by_hand
    assert untied.num_params() == tied.num_params() + emb
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True) + emb
    assert tied.num_params(non_embedding=True) == sum(
        p.numel() for n, p in tied.named_parameters() if "emb" not in n
    )


def test_per_block_param_count():
    cfg = GPTConfig.tiny()
    d = cfg.d_model
    # qkv + proj + fc + proj weights and biases, two LayerNorms.
    per_block = 12 * d * d + (3 * d + d + 4 * d + d) + 4 * d
    assert sum(p.numel() for p in Block(cfg).parameters()) == per_block


@pytest.mark.parametrize("tie", [True, False])
def test_output_shape(tie):
    cfg = GPTConfig.tiny(tie_embeddings=tie)
    model = GPT(cfg)
    for T in (1, 7, cfg.seq_len):
        logits = model(torch.randint(0, cfg.vocab_size, (3, T)))
        assert logits.shape == (3, T, cfg.vocab_size)
        assert logits.dtype == torch.float32


def test_blocks_are_the_shard_units():
    model = _tiny()
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert len(model.blocks) == model.cfg.n_layer
    assert all(isinstance(b, Block) for b in model.blocks)


def test_rejects_too_long_sequence():
    model = _tiny()
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, model.cfg.seq_len + 1, dtype=torch.long))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=256, n_layer=1, n_head=3, d_model=32, seq_len=8)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig.tiny(n_layer=0)


def test_fixed_seed_forward_is_deterministic():
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    a, b = _tiny()(idx), _tiny()(idx)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()


def test_causal():
    model = _tiny()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt2_init_scales():
    cfg = GPTConfig.tiny(n_layer=8, d_model=256, n_head=4)
    torch.manual_seed(0)
    model = GPT(cfg)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0


def test_initial_loss_is_near_uniform():
    model = _tiny()
    x, y = torch.randint(0, 256, (2, 4, 32))
    loss = gpt_loss(lambda params, idx: model(idx))(None, {"x": x, "y": y})
    assert loss.item() == pytest.approx(math.log(256), abs=0.1)
    torch.testing.assert_close(loss, F.cross_entropy(model(x).flatten(0, 1), y.flatten()))


def test_flops_per_token():
    cfg = GPTConfig.tiny()
    model, untied = GPT(cfg), GPT(cfg.replace(tie_embeddings=False))
    n = model.num_params() - cfg.seq_len * cfg.d_model  # no pos_emb; tied head counted once
    assert model.flops_per_token() == 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len
    assert untied.flops_per_token() == model.flops_per_token()  # tok_emb lookup is free
    assert model.flops_per_token(8) < model.flops_per_token()


def test_large_presets_on_meta():
    for cfg, billions in ((GPTConfig.gpt_1b4(), 1.3), (GPTConfig.gpt_8b5(), 8.3)):
        with torch.device("meta"):
            model = GPT(cfg)
        assert model.num_params() / 1e9 == pytest.approx(billions, abs=0.1)
        assert model.head.weight is model.tok_emb.weight


def test_default_config_is_dense():
    cfg = GPTConfig.tiny()
    assert cfg.experts == 0 and cfg.moe_layers() == []
    model = GPT(cfg)
    assert all("mlp" in b._modules and "moe" not in b._modules for b in model.blocks)
    assert model.num_params(active=True) == model.num_params()
    assert not any("moe" in name for name, _ in model.named_parameters())
