"""Image prototype bank: per-class masked average of (stop-gradient) pixel embeddings, EMA over steps."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from protoseg_jax import ops


@flax.struct.dataclass
class PrototypeBank:
  """`prototypes` `[C, E]` unit rows (zeros until a class is first seen); `seen` `[C]` bool."""

  prototypes: jax.Array
  seen: jax.Array

  @classmethod
  def empty(cls, num_classes: int, embed_dim: int) -> 'PrototypeBank':
    return cls(jnp.zeros((num_classes, embed_dim), jnp.float32), jnp.zeros((num_classes,), bool))


def class_sums(embeddings: jax.Array, labels: jax.Array, weights: jax.Array,
               num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Per-class sums and counts: embeddings `[..., E]`, labels `[...]`, weights `[...]` -> `[C, E]`, `[C]`.

  Pixels with weight 0 (ignored, unconfident) or a label outside 0..C-1 contribute nothing.
  """
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weights.astype(jnp.float32)[..., None]
  embed_dim = embeddings.shape[-1]
  sums = jnp.einsum('nc,ne->ce', one_hot.reshape(-1, num_classes),
                    embeddings.astype(jnp.float32).reshape(-1, embed_dim),
                    precision=jax.lax.Precision.HIGHEST)
  return sums, jnp.sum(one_hot.reshape(-1, num_classes), axis=0)


def ema_update(bank: PrototypeBank, sums: jax.Array, counts: jax.Array, momentum: float) -> PrototypeBank:
  """One EMA step with this batch's class means.

  For each class c with pixels in the batch: `P_c <- normalise(m P_c + (1 - m) normalise(sum_c / n_c))`;
  a class seen for the first time takes the batch prototype as is; absent classes keep their row.
  Under a mesh the sums and counts are global-batch values (jit over sharded arrays), so every device holds
  the same bank.
  """
  sums, counts = jax.lax.stop_gradient((sums, counts))
  present = counts > 0
  batch = ops.l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])
  mixed = jnp.where(bank.seen[:, None], momentum * bank.prototypes + (1.0 - momentum) * batch, batch)
  prototypes = jnp.where(present[:, None], ops.l2_normalize(mixed), bank.prototypes)
  return PrototypeBank(prototypes, bank.seen | present)
