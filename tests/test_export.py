"""fs.export / fs.load_safetensors: trained params out to safetensors and back.

The key checks load the exported directory with ``transformers``' own
``from_pretrained`` (local files, no network) and compare its logits with the trained
params run through ``fs.functional``'s apply: a GPT-2 (tied head) and a Llama, trained in
a world of one and under ZeRO-3 on a gloo world of 2.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import fscale as fs
from fscale.models import GPT, GPTConfig
from tests.dist import run_world
from tests.helpers import TiedLM, lm_batches

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 61


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=kind == "llama_tied", bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _train(kind: str, rank: int = 0, world: int = 1, stage: int = 0, precision=None):
    """(params, state, apply) after 3 steps on the same global batches in any world."""
    model = _hf_model(kind)
    params, apply = fs.functional(model)

    def loss_fn(p, batch):
        return apply(p, input_ids=batch["x"], labels=batch["x"]).loss

    step = fs.train_step(loss_fn, fs.optim.adamw(1e-2, weight_decay=0.0), model=apply)
    if precision:
        step = fs.mixed_precision(step, precision)
    if stage:
        step = fs.shard_zero(step, stage)
    params, state = step.init(params)
    per = 4 // world
    for batch in lm_batches(3, 4, 8, vocab=VOCAB):
        params, state, _ = step(params, state, {"x": batch["x"][rank * per : (rank + 1) * per]})
    return params, state, apply


def _tokens():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))


def _from_pretrained(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, output_loading_info=True
    )
    # strict semantics: every key of the file used, every weight of the model found.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model.eval()


@torch.no_grad()
def _assert_same_logits(hf_model, apply, full_params):
    x = _tokens()
    expected = apply(full_params, input_ids=x).logits
    got = hf_model(input_ids=x).logits
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama_tied"])
def test_from_pretrained_gives_the_trained_logits(kind, tmp_path):
    params, state, apply = _train(kind)
    out = fs.export(tmp_path, params, state, model=apply)
    assert out == tmp_path / "model.safetensors"
    assert (tmp_path / "config.json").is_file()  # written for a Hugging Face model
    _assert_same_logits(_from_pretrained(tmp_path), apply, params)

    # Round trip into fresh params of the same architecture: bit-equal.
    fresh, fresh_apply = fs.functional(_hf_model(kind))
    loaded = fs.load_safetensors(tmp_path, fresh, model=fresh_apply)
    assert loaded.keys() == params.keys()
    for name in params:
        assert torch.equal(loaded[name], params[name]), name


def test_tied_names_every_key_or_first_only(tmp_path):
    params, state, apply = _train("gpt2")
    assert apply.aliases["transformer.wte.weight"] == ["lm_head.weight"]
    every = fs.export(tmp_path / "all.safetensors", params, state, model=apply)
    tensors = safetensors_torch.load_file(every)
    assert tensors.keys() == apply.module.state_dict().keys()
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])
    # Loadable by a strict load_state_dict of a plain module.
    module = _hf_model("gpt2").eval()
    module.load_state_dict(tensors, strict=True)
    _assert_same_logits(module, apply, params)

    (tmp_path / "first").mkdir()
    fs.export(tmp_path / "first", params, state, model=apply, tied="first")
    first = safetensors_torch.load_file(tmp_path / "first" / "model.safetensors")
    assert "lm_head.weight" not in first  # as save_pretrained writes it
    hf = _from_pretrained(tmp_path / "first")
    assert hf.lm_head.weight is hf.transformer.wte.weight
    _assert_same_logits(hf, apply, params)


def test_load_a_save_pretrained_checkpoint(tmp_path):
    """A checkpoint transformers wrote itself (tied head under its first name only)."""
    model = _hf_model("gpt2")
    model.save_pretrained(tmp_path)
    fresh, apply = fs.functional(_hf_model("gpt2").apply(_scramble))
    loaded = fs.load_safetensors(tmp_path, fresh, model=apply)
    for name, p in fs.functional(model)[0].items():
        assert torch.equal(loaded[name], p), name
    # And from a state dict, with the head under its alias only.
    sd = {k: v for k, v in model.state_dict().items() if k != "transformer.wte.weight"}
    loaded = fs.load_state_dict(sd, fresh, model=apply)
    assert torch.equal(loaded["transformer.wte.weight"], model.lm_head.weight)


def _scramble(module):
    for p in module.parameters(recurse=False):
        torch.nn.init.normal_(p.data)


def test_fscale_gpt_export_and_load(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny())
    params, apply = fs.functional(model)
    step = fs.train_step(_gpt_loss(apply), fs.optim.adamw(1e-2), model=apply)
    params, state = step.init(params)
    for batch in lm_batches(2, 2, 16, vocab=256):
        params, state, _ = step(params, state, batch)
    path = fs.export(tmp_path / "gpt.safetensors", params, state, model=model)
    tensors = safetensors_torch.load_file(path)
    assert tensors.keys() == model.state_dict().keys()  # head.weight too (tied)
    assert all(t.dtype == torch.float32 for t in tensors.values())

    torch.manual_seed(1)
    other = GPT(GPTConfig.tiny())
    other.load_state_dict(tensors, strict=True)
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(other(x), apply(params, x))
    fresh, fresh_apply = fs.functional(other)
    loaded = fs.load_safetensors(path, fresh, model=fresh_apply)
    assert all(torch.equal(loaded[n], params[n]) for n in params)


def _gpt_loss(apply):
    def loss_fn(p, batch):
        return F.cross_entropy(apply(p, batch["x"]).flatten(0, 1), batch["y"].flatten())

    return loss_fn


def test_dtype_option_and_no_model(tmp_path):
    params, state, apply = _train("llama")
    path = fs.export(tmp_path / "bf16.safetensors", params, dtype=torch.bfloat16)
    tensors = safetensors_torch.load_file(path)
    assert tensors.keys() == params.keys()  # no model: the params' own names
    for name, t in tensors.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, params[name].bfloat16()), name
    loaded = fs.load_safetensors(path, params)  # cast back to each param's dtype
    assert all(loaded[n].dtype == torch.float32 for n in params)
    with pytest.raises(ValueError, match="floating dtype"):
        fs.export(tmp_path / "x.safetensors", params, dtype=torch.int8)


def test_config_json_without_the_model_or_from_a_dataclass(tmp_path):
    params, state, apply = _train("llama")
    hf_config = apply.module.config

    # No model: the params' own names (which are the module's here) plus config= make a
    # directory from_pretrained loads.
    fs.export(tmp_path / "hf", params, state, config=hf_config)
    _assert_same_logits(_from_pretrained(tmp_path / "hf"), apply, params)

    # Neither a model with a config nor config=: written, with a warning naming the fix.
    with pytest.warns(UserWarning, match="without a config.json.*config="):
        fs.export(tmp_path / "bare", params, state)
    assert not (tmp_path / "bare" / "config.json").exists()

    # fscale's GPT: its GPTConfig (a dataclass), marked for fscale.serve, from config=
    # or from the module itself.
    cfg = GPTConfig.tiny()
    gpt = GPT(cfg)
    gpt_params, _ = fs.functional(gpt)
    fs.export(tmp_path / "gpt", gpt_params, config=cfg)
    written = json.loads((tmp_path / "gpt" / "config.json").read_text())
    assert written["model_type"] == "fscale_gpt"
    assert GPTConfig(**{k: v for k, v in written.items() if k in cfg.__dataclass_fields__}) == cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the module's own config: no warning
        fs.export(tmp_path / "gpt-module", gpt_params, model=gpt)
    assert json.loads((tmp_path / "gpt-module" / "config.json").read_text()) == written

    with pytest.raises(TypeError, match="config must be a transformers config"):
        fs.export(tmp_path / "bad", params, config=["not", "a", "config"])
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        fs.export(tmp_path / "bad", params, config={"dtype": torch.float32})
    assert not (tmp_path / "bad").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- errors


def test_shape_mismatch_names_the_param_and_both_shapes(tmp_path):
    params, apply = fs.functional(_hf_model("gpt2"))
    sd = dict(_hf_model("gpt2").state_dict())
    sd["transformer.wpe.weight"] = torch.zeros(8, 16)
    with pytest.raises(
        ValueError, match=r"'transformer.wpe.weight' has shape \(8, 16\).*\(16, 16\)"
    ):
        fs.load_state_dict(sd, params, model=apply)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    params, apply = fs.functional(_hf_model("gpt2"))
    sd = dict(_hf_model("gpt2").state_dict())
    del sd["transformer.ln_f.bias"]
    sd["transformer.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"missing transformer.ln_f.bias, unexpected "
                       r"transformer.extra.weight"):  # fmt: skip
        fs.load_state_dict(sd, params, model=apply)
    loaded = fs.load_state_dict(sd, params, model=apply, strict=False)
    assert loaded["transformer.ln_f.bias"] is params["transformer.ln_f.bias"]
    # Without model=, the tied alias is unknown: named, with the fix.
    sd = _hf_model("gpt2").state_dict()
    with pytest.raises(ValueError, match=r"unexpected lm_head.weight.*Pass model="):
        fs.load_state_dict(sd, params)


def test_tied_names_with_different_values_raise():
    params, apply = fs.functional(_hf_model("gpt2"))
    sd = dict(_hf_model("gpt2").state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="one tied weight.*different values"):
        fs.load_state_dict(sd, params, model=apply)


def test_export_refuses_params_of_another_module(tmp_path):
    params, _ = fs.functional(_hf_model("gpt2"))
    with pytest.raises(ValueError, match=r"transformer.wte.weight.*not in LlamaForCausalLM"):
        fs.export(tmp_path, params, model=_hf_model("llama"))
    assert not list(tmp_path.iterdir())  # nothing written


def test_corrupt_or_missing_file_is_named(tmp_path):
    params, apply = fs.functional(_hf_model("gpt2"))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=str(bad)):
        fs.load_safetensors(bad, params, model=apply)
    with pytest.raises(FileNotFoundError, match="nothing"):
        fs.load_safetensors(tmp_path / "nothing", params, model=apply)


def test_export_is_atomic(tmp_path, monkeypatch):
    params, state, apply = _train("gpt2")
    path = fs.export(tmp_path, params, state, model=apply)
    before = path.read_bytes()

    def torn_write(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_torch, "save_file", torn_write)
    trained = {k: v + 1 for k, v in params.items()}
    with pytest.raises(OSError, match="No space left"):
        fs.export(tmp_path, trained, model=apply)
    assert path.read_bytes() == before  # the previous export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_sharded_index_directory(tmp_path):
    """A checkpoint split over files with model.safetensors.index.json (large HF models)."""
    model = _hf_model("llama")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(sd)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        safetensors_torch.save_file({k: sd[k] for k in part}, tmp_path / name)
    index = {"weight_map": {k: f for f, part in halves.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    fresh, apply = fs.functional(_hf_model("llama").apply(_scramble))
    loaded = fs.load_safetensors(tmp_path, fresh, model=apply)
    assert all(torch.equal(loaded[k], sd[k]) for k in fresh)


# ----------------------------------------------------------------------------- gloo world


def _world_export(rank, world, out_dir):
    results = {}
    for kind, stage, precision in (("gpt2", 3, None), ("llama", 3, None), ("llama", 2, "bf16")):
        params, state, apply = _train(kind, rank, world, stage, precision)
        path = pathlib.Path(out_dir) / f"{kind}_{stage}"
        fs.export(path, params, state, model=apply)
        full = fs.gather_params(params, state)  # collective; the export must hold these
        results[(kind, stage)] = {k: v.float().clone() for k, v in full.items()}
        if stage == 3:
            assert any(params[k].shape != full[k].shape for k in full)  # were shards
    return results


@pytest.mark.parametrize("world", [2])
def test_zero_world_export_loads_in_transformers(tmp_path, world):
    ranks = run_world(_world_export, world, str(tmp_path), timeout=240)
    assert ranks[0].keys() == ranks[1].keys()
    for (kind, stage), full in ranks[0].items():
        path = tmp_path / f"{kind}_{stage}"
        assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
        # Stage 3 shards gathered; stage 2 + bf16: the fp32 masters, not bf16 params.
        tensors = safetensors_torch.load_file(path / "model.safetensors")
        for name, value in full.items():
            assert tensors[name].dtype == torch.float32
            assert torch.equal(tensors[name], value), (kind, stage, name)
        hf = _from_pretrained(path)
        _, apply = fs.functional(_hf_model(kind))
        _assert_same_logits(hf, apply, full)

    # And the world of 2 trained what a world of one trains (up to reduction order).
    params, _, _ = _train("llama")
    for name, value in ranks[0][("llama", 3)].items():
        torch.testing.assert_close(value, params[name], rtol=1e-5, atol=1e-6)


def _world_failed_write(rank, world, bad_parent):
    params, state, apply = _train("gpt2", rank, world, 3)
    try:
        fs.export(pathlib.Path(bad_parent) / "out", params, state, model=apply)
    except Exception as e:  # every rank must raise, none may hang
        return type(e).__name__, str(e)
    return None


def test_a_failed_write_raises_on_every_rank(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    results = run_world(_world_failed_write, 2, str(blocker), timeout=120)
    assert results[0] is not None and results[0][0] in ("FileExistsError", "NotADirectoryError")
    assert results[1] == ("RuntimeError", results[1][1])
    assert "rank 0 failed to write" in results[1][1]


def _tied_lm_export(tmp_path, name, offload=None):
    torch.manual_seed(0)
    params, apply = fs.functional(TiedLM(vocab=11, dim=8))
    step = fs.train_step(_gpt_loss(apply), fs.optim.adamw(1e-2))
    step = fs.shard_zero(fs.mixed_precision(step, "bf16"), 1)
    if offload:
        step = fs.offload(step, offload, path=str(tmp_path / "swap") if offload == "nvme" else None)
    params, state = step.init(params)
    for batch in lm_batches(3, 2, 4, vocab=11):
        params, state, _ = step(params, state, batch)
    path = fs.export(tmp_path / f"{name}.safetensors", params, state, model=apply)
    return safetensors_torch.load_file(path), params


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_offloaded_masters_are_exported(tmp_path, offload):
    """bf16 + stage 1 + offload: the file holds the fp32 masters from host memory or NVMe."""
    (tmp_path / "swap").mkdir()
    expected, _ = _tied_lm_export(tmp_path, "plain")
    got, params = _tied_lm_export(tmp_path, offload, offload)
    assert got.keys() == expected.keys() and "head.weight" in got  # tied: under both names
    for name, value in expected.items():
        # Offload's host update rounds like the device's up to an ulp or two.
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)
    # Not the bf16 params upcast: those are ~1e-3 away.
    assert params["emb.weight"].dtype == torch.bfloat16
    assert not torch.equal(got["emb.weight"], params["emb.weight"].float())


class _WithBuffer(torch.nn.Module):
    """Trainable, frozen and buffer entries in one state_dict."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))

    def forward(self, x):
        return self.lin(x) * self.scale + self.frozen


def test_buffers_and_frozen_params_travel_with_the_module(tmp_path):
    torch.manual_seed(0)
    module = _WithBuffer()
    params, apply = fs.functional(module)
    assert set(params) == {"lin.weight", "lin.bias"}
    path = fs.export(tmp_path / "m.safetensors", params, model=apply)
    assert safetensors_torch.load_file(path).keys() == module.state_dict().keys()

    other = _WithBuffer()
    fresh, fresh_apply = fs.functional(other)
    loaded = fs.load_safetensors(path, fresh, model=fresh_apply)
    assert torch.equal(other.scale, module.scale) and torch.equal(other.frozen, module.frozen)
    x = torch.randn(4, 3)
    assert torch.equal(fresh_apply(loaded, x), apply(params, x))

    # A bad entry anywhere: nothing is copied into the module.
    before = other.scale.clone()
    sd = {**module.state_dict(), "scale": torch.zeros(2) + 7, "lin.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"'lin.bias' has shape \(5,\)"):
        fs.load_state_dict(sd, fresh, model=fresh_apply)
    assert torch.equal(other.scale, before)


def test_export_of_a_params_subset_names_what_is_missing(tmp_path):
    params, apply = fs.functional(_WithBuffer())
    with pytest.raises(ValueError, match=r"trainable params lin.bias are not in params"):
        fs.export(tmp_path, {"lin.weight": params["lin.weight"]}, model=apply)
