"""Tiny Hugging Face model directories for the serving tests (engine and server).

Each fixture builds a randomly initialised model from a ``transformers`` config with a
fixed seed, saves it with ``save_pretrained(safe_serialization=True)`` into a session temp
dir, and adds a small byte-level BPE tokenizer trained on a few sentences (vocab 300), so
the directory looks like one downloaded from the Hub: ``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``.

- ``tiny_llama_dir``: LlamaForCausalLM (hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 320,
  rope_theta 10000, untied head), with a chat template.
- ``tiny_gpt2_dir``: GPT2LMHeadModel (hidden 64, 2 layers, 4 heads, vocab 320, tied head),
  without a chat template (``apply_chat_template`` must raise ``ValueError``).
- ``bos_llama_dir``: the tiny Llama's weights with a tokenizer whose post-processor
  prepends ``<s>`` (id 0), as Llama's do, and a chat template that writes ``bos_token``.
- ``metaspace_llama_dir``: the tiny Llama's weights with a SentencePiece-style tokenizer
  (WordLevel words ``▁w0`` ... over all 320 ids, Metaspace pre-tokenizer and decoder).
- ``llama_dir_with(config=..., generation_config=...)``: a copy of the tiny Llama
  directory with config.json entries replaced and a generation_config.json written.

Usage::

    def test_x(tiny_llama_dir):
        engine = Engine(tiny_llama_dir)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

VOCAB = 320  # the model's; the tokenizer uses the first 300 ids
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Serving engines batch requests continuously.",
    "A paged KV cache keeps blocks of keys and values; prefix caching shares them.",
    "Dynamic SplitFuse splits long prompts into chunks and fuses them with decodes.",
    "Once upon a time there was a tiny language model that liked to talk.",
    "naïve café — 東京 😀 multi-byte text must not be split.",
]


def _tokenizer(chat_template: str | None, *, bos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if bos:  # what Llama tokenizers do: encode(text) starts with <s>
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny HF Llama directory (config.json + model.safetensors + tokenizer); returns its Path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # Larger-than-default init so greedy argmaxes are well separated (no fp32 near-ties).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer(CHAT_TEMPLATE).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny HF GPT-2 directory (tied head, no chat template); returns its Path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(1)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer(None).save_pretrained(path)
    return path


def _copy_llama(src, dst, config: dict | None = None):
    """``src``'s weights and tokenizer in ``dst``, config.json entries replaced by ``config``."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    if config:
        data = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**data, **config}))
    return dst


@pytest.fixture(scope="session")
def bos_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a tokenizer that adds <s> to text, and a template that writes it."""
    path = _copy_llama(tiny_llama_dir, tmp_path_factory.mktemp("bos-llama"))
    _tokenizer("{{ bos_token }}" + CHAT_TEMPLATE, bos=True).save_pretrained(path)
    return path


def _metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>"]
    words = [f"\u2581w{i}" for i in range(VOCAB - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def metaspace_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a SentencePiece-style tokenizer (every id a word ``▁wN``)."""
    path = _copy_llama(tiny_llama_dir, tmp_path_factory.mktemp("metaspace-llama"))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / f).unlink(missing_ok=True)
    _metaspace_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def llama_dir_with(tiny_llama_dir, tmp_path):
    """``make(config=None, generation_config=None)``: a tiny Llama directory copy with
    config.json entries replaced and, if given, that generation_config.json."""

    def make(config: dict | None = None, generation_config: dict | None = None):
        path = _copy_llama(tiny_llama_dir, tmp_path / "llama", config)
        if generation_config is not None:
            (path / "generation_config.json").write_text(json.dumps(generation_config))
        return path

    return make
