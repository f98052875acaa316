"""The built-in default: a tiny DualProtoSeg on the synthetic H&E set, trainable on a 2-core CPU.

Same code path as `configs/bcss.py` (the synthetic set is written in the BCSS-WSSS folder layout and read
back by the real reader); only the sizes differ. No downloads: random frozen towers, byte tokenizer.

  python -m protoseg_jax.main --config=configs/demo.py --workdir=/tmp/demo
"""

from protoseg_jax.methods.dualprotoseg import config as dualprotoseg_config


def get_config():
  config = dualprotoseg_config.get_config()
  config.data.kind = 'synthetic'
  config.data.mpp = 0.5                    # the synthetic set has no physical scale: 20x by convention
  config.data.root = ''                    # '' = <workdir>/synthetic_bcss
  config.data.synthetic.num_train = 768
  config.data.synthetic.num_val = 64
  config.data.synthetic.num_test = 64
  config.data.cache_in_memory = True
  config.data.decode_threads = 2
  config.data.grain.read_threads = 2
  config.data.grain.prefetch_buffer_size = 4

  config.tokenizer.kind = 'bytes'

  config.model.prompts_per_class = 4
  config.model.n_ctx = 4
  # Narrow head, but >= 4 channels per GroupNorm group: with fewer, GN acts like instance norm on the
  # tiny pyramid levels and the level-4 CAM (the one evaluated) loses its spatial contrast.
  config.model.refiner_width = 32
  config.model.refiner_blocks = 1
  config.model.feature_dim = 32
  config.model.group_norm_groups = 4
  config.model.pyramid_channels = (32, 16, 16, 16)
  config.model.vit.update(width=96, depth=4, num_heads=3, pos_embed_grid=14, taps=(0, 1, 2, 3))
  config.model.text.update(vocab_size=259, context_table=48, context_length=48, width=64, depth=2,
                           num_heads=2, embed_dim=64)
  config.prompts.phrases = tuple(phrases[:4] for phrases in config.prompts.phrases)

  config.train.batch_size = 16
  config.train.epochs = 6
  config.train.learning_rate = 5e-3
  config.train.log_every_steps = 16
  config.eval.batch_size = 32
  config.eval.crf = 'off'                  # the dense CRF needs the [crf] extra; the demo runs without it
  return config
