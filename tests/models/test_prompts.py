"""Tokenizers, prompt token layout, context initialisation and the prompt learner's splice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax import tokenizer as tokenizer_lib
from protoseg_jax.errors import UserError
from protoseg_jax.models import text as text_lib


def test_byte_tokenizer():
  tok = tokenizer_lib.ByteTokenizer()
  assert tok.encode('TILs') == [3 + ord(c) for c in 'TILs']
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 259)


def test_prompt_token_layout_and_too_long_error():
  ids = text_lib.build_prompt_token_ids([[7, 8], [9]], n_ctx=3, bos_id=1, eos_id=2, context_length=8)
  np.testing.assert_array_equal(ids, [[1, 0, 0, 0, 7, 8, 2, 0], [1, 0, 0, 0, 9, 2, 0, 0]])
  with pytest.raises(ValueError, match='prompt 0 needs 9 tokens'):
    text_lib.build_prompt_token_ids([[5] * 4], n_ctx=3, bos_id=1, eos_id=2, context_length=8)


def test_prompts_of_phrases_fit_the_phrase_budget_and_a_too_large_tokenizer_is_refused():
  tok = tokenizer_lib.ByteTokenizer()
  budget = text_lib.phrase_token_budget(n_ctx=3, context_length=10)
  assert budget == 10 - 2 - 3
  ids = text_lib.prompt_token_ids(tok, ['ab', 'x' * budget], n_ctx=3, context_length=10)
  np.testing.assert_array_equal(ids[0], [1, 0, 0, 0, 3 + ord('a'), 3 + ord('b'), 2, 0, 0, 0])
  assert ids[1, -1] == 2                                         # a phrase of the budget fills the context
  with pytest.raises(ValueError, match='prompt 0 needs 11 tokens'):
    text_lib.prompt_token_ids(tok, ['x' * (budget + 1)], n_ctx=3, context_length=10)
  text_lib.check_tokenizer_fits(tok, 259)
  with pytest.raises(UserError, match=r'^the tokenizer has 259 ids but config.model.text.vocab_size is 258$'):
    text_lib.check_tokenizer_fits(tok, 258)


def test_initial_context_repeats_last_token_and_adds_noise():
  table = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
  init_ids = [1, 10, 11, 2]  # BOS a b EOS -> padded with EOS to n_ctx + 2 = 6 -> ids 1..4 = 10 11 2 2
  context = text_lib.initial_context(table, init_ids, num_classes=2, n_ctx=4, noise_std=0.0,
                                     rng=np.random.default_rng(0))
  np.testing.assert_array_equal(context[0], table[[10, 11, 2, 2]])
  np.testing.assert_array_equal(context[1], context[0])
  noisy = text_lib.initial_context(table, init_ids, 2, 4, 0.02, np.random.default_rng(0))
  assert 0.01 < np.std(noisy - context) < 0.03 and not np.allclose(noisy[0], noisy[1])


def test_prompt_learner_splices_class_context():
  learner = text_lib.PromptLearner(num_classes=2, n_ctx=2, width=3)
  embeddings = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 3)), jnp.float32)  # 2 classes x 2
  params = learner.init(jax.random.key(0), embeddings)
  ctx = np.asarray(params['params']['ctx'])
  out = np.asarray(learner.apply(params, embeddings))
  for prompt in range(4):
    np.testing.assert_array_equal(out[prompt, 1:3], ctx[prompt // 2])
    np.testing.assert_array_equal(out[prompt, [0, 3, 4, 5]], np.asarray(embeddings)[prompt, [0, 3, 4, 5]])


def test_json_tokenizer_reads_a_local_tokenizer_file(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  vocab = {'<pad>': 0, '<start_of_text>': 1, '<end_of_text>': 2, 'tumor': 3, 'necrosis': 4, '[UNK]': 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  path = tmp_path / 'tokenizer.json'
  tok.save(str(path))
  loaded = tokenizer_lib.JsonTokenizer(str(path), '<start_of_text>', '<end_of_text>', lowercase=True)
  assert loaded.encode('Tumor necrosis') == [3, 4]
  assert (loaded.bos_id, loaded.eos_id) == (1, 2)
  with pytest.raises(ValueError, match='special tokens'):
    tokenizer_lib.JsonTokenizer(str(path), '<bos>', '<end_of_text>')
  with pytest.raises(UserError, match=r'not found: .*missing\.json \(config\.tokenizer\.path\)'):
    tokenizer_lib.JsonTokenizer(str(tmp_path / 'missing.json'), '<bos>', '<eos>')
