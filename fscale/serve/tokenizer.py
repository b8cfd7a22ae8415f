"""Text <-> token ids for the engine: the model directory's tokenizer, or bytes.

``load_tokenizer(dir)`` wraps ``transformers.AutoTokenizer`` (chat template included) when
the directory has a tokenizer and transformers is installed, else ``tokenizers`` with the
template from ``tokenizer_config.json`` / ``chat_template.jinja`` rendered by jinja2; with
no tokenizer files it is :class:`ByteTokenizer` (ids 0..255 are bytes, no eos), the
vocabulary of fscale's GPT.

Usage::

    tok = load_tokenizer(model_dir)       # or ByteTokenizer()
    ids = tok.encode("hello"); text = tok.decode(ids)   # with the tokenizer's BOS, as HF
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
"""

from __future__ import annotations

import json
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; ``decode`` replaces invalid bytes with U+FFFD."""

    eos_token_id = None
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's UTF-8 bytes (there are no special tokens to add)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        raise ValueError(
            "this model has no chat template (byte tokenizer); use a completion prompt, "
            "or serve a model directory whose tokenizer_config.json has a chat_template."
        )


class HFTokenizer:
    """A Hugging Face tokenizer behind the engine's small interface."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._template = None
        try:
            from transformers import AutoTokenizer
        except ImportError:
            AutoTokenizer = None
        if AutoTokenizer is not None:
            self._hf = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self._tok = None
            self.eos_token_id = self._hf.eos_token_id
            self.vocab_size = len(self._hf)
            return
        from tokenizers import Tokenizer

        self._hf = None
        self._tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        config = _read_json(self.path / "tokenizer_config.json")
        jinja = self.path / "chat_template.jinja"
        self._template = jinja.read_text() if jinja.exists() else config.get("chat_template")
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self._tok.token_to_id(eos) if eos else None
        self._special = config.get("bos_token"), eos
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; by default with the tokenizer's special tokens (a BOS
        for Llama-style tokenizers), as HF's ``tokenizer(text)`` and vLLM's completions
        do. Text already rendered by a chat template carries them: pass False."""
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=add_special_tokens))
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if self._hf is not None:
            if not getattr(self._hf, "chat_template", None):
                raise ValueError(_NO_TEMPLATE.format(self.path))
            out = self._hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            # transformers 5 returns a BatchEncoding, 4.x a list.
            ids = out["input_ids"] if not isinstance(out, list) else out
            return list(ids)
        if not self._template:
            raise ValueError(_NO_TEMPLATE.format(self.path))
        import jinja2

        bos, eos = self._special
        text = (
            jinja2.Environment()
            .from_string(self._template)
            .render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
        )
        return self.encode(text, add_special_tokens=False)  # the template has the BOS


_NO_TEMPLATE = (
    "the model directory {} has no chat template (no chat_template in tokenizer_config.json "
    "nor chat_template.jinja); use /v1/completions with a plain prompt, or add a template."
)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def load_tokenizer(path: str | Path | None):
    """The tokenizer of model directory ``path``; :class:`ByteTokenizer` without one."""
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        return HFTokenizer(path)
    return ByteTokenizer()
