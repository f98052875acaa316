"""A tiny DualProtoSeg config (32x32 tiles, patch 8) for tests; loadable by `--config=tests/tiny_config.py`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `configs` importable

from configs import demo  # noqa: E402


def get_config():
  """The demo config shrunk so a train step compiles and runs in seconds on a CPU."""
  config = demo.get_config()
  config.data.image_size = 32
  config.data.synthetic.update(num_train=16, num_val=6, num_test=5)
  config.model.update(prompts_per_class=2, n_ctx=2, refiner_width=16, refiner_blocks=1, feature_dim=16,
                      group_norm_groups=4, pyramid_channels=(8, 8, 4, 4), pyramid_upsample=(1, 2, 4, 8))
  config.model.vit.update(patch_size=8, width=32, depth=2, num_heads=2, pos_embed_grid=4, taps=(0, 0, 1, 1))
  config.model.text.update(context_table=40, context_length=40, width=16, depth=1, num_heads=2,
                           embed_dim=16)
  config.prompts.phrases = tuple(phrases[:2] for phrases in config.prompts.phrases)
  config.train.update(batch_size=4, epochs=2, log_every_steps=2)
  config.eval.batch_size = 4
  return config
