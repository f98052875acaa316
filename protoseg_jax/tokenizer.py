"""Tokenizers for the text tower: a built-in byte tokenizer (no files) or a local `tokenizer.json`.

A tokenizer here is anything with `encode(text) -> list[int]` (no special tokens), `bos_id` and `eos_id`.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from protoseg_jax.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids: 0 pad, 1 BOS, 2 EOS, 3 + byte. Vocabulary 259.

  For demo and test models with random text towers: it needs no file and is exactly reproducible.
  """

  bos_id: int = 1
  eos_id: int = 2
  offset: int = 3

  @property
  def vocab_size(self) -> int:
    return self.offset + 256

  def encode(self, text: str) -> list[int]:
    return [self.offset + byte for byte in text.encode('utf-8')]


class JsonTokenizer:
  """A Hugging Face fast tokenizer read from a local `tokenizer.json` (CONCH, PLIP, CLIP)."""

  def __init__(self, path: str, bos_token: str, eos_token: str, lowercase: bool = False):
    from tokenizers import Tokenizer  # shipped with transformers

    if not os.path.isfile(path):
      raise UserError(f'tokenizer file not found: {path} (config.tokenizer.path)')
    self._tokenizer = Tokenizer.from_file(path)
    self.lowercase = lowercase
    ids = [self._tokenizer.token_to_id(token) for token in (bos_token, eos_token)]
    if None in ids:
      raise UserError(f'{path}: special tokens {bos_token!r}/{eos_token!r} are not in the vocabulary')
    self.bos_id, self.eos_id = ids
    self.vocab_size = self._tokenizer.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    text = text.lower() if self.lowercase else text
    return self._tokenizer.encode(text, add_special_tokens=False).ids


def build_tokenizer(config: ml_collections.ConfigDict):
  """`config.kind` is 'bytes' or 'json' (with `path`, `bos_token`, `eos_token`, `lowercase`)."""
  if config.kind == 'bytes':
    return ByteTokenizer()
  if config.kind == 'json':
    return JsonTokenizer(config.path, config.bos_token, config.eos_token, config.get('lowercase', False))
  raise ConfigError(f"config.tokenizer.kind must be 'bytes' or 'json', got {config.kind!r}")


def for_backbone(tokenizer_config: ml_collections.ConfigDict, backbone: ml_collections.ConfigDict):
  """`build_tokenizer`, where a transformers CLIPModel folder (`backbone.source='hf_clip'`) carries its own
  `tokenizer.json`, used unless `tokenizer_config.path` names another file."""
  if tokenizer_config.kind == 'json' and not tokenizer_config.path and backbone.get('source') == 'hf_clip':
    tokenizer_config = ml_collections.ConfigDict({**tokenizer_config.to_dict(),
                                                  'path': os.path.join(backbone.path, 'tokenizer.json')})
  return build_tokenizer(tokenizer_config)
