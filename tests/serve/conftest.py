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

Usage::

    def test_x(tiny_llama_dir):
        engine = Engine(tiny_llama_dir)
"""

from __future__ import annotations

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


def _tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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
