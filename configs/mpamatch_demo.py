"""Tiny MPAMatch on the synthetic H&E set (exact masks), 1/8 of the tiles labelled; trains on a CPU.

Same code path as `configs/glas_semi.py`; only sizes differ. No downloads: random-init trunk and frozen text
tower, byte tokenizer. The set is written once to <workdir>/synthetic_seg (224 x 224 tiles, five classes,
background first); training cuts 128 x 128 windows on the host, rescales and crops them to 64 x 64 on the
device, and evaluation slides a 64 x 64 window over the whole tiles.

  python -m protoseg_jax.main --config=configs/mpamatch_demo.py --workdir=/tmp/mpamatch_demo
  # ablation: --config.loss.variant=unimatch | supervised
"""

from protoseg_jax.methods.mpamatch import config as mpamatch_config


def get_config():
  config = mpamatch_config.get_config()
  config.data.kind = 'synthetic'
  config.data.mpp = 0.5                    # the synthetic set has no physical scale: 20x by convention
  config.data.root = ''                    # '' = <workdir>/synthetic_seg
  config.data.class_names = mpamatch_config.CLASS_NAMES['synthetic']
  config.data.palette = mpamatch_config.SYNTHETIC_PALETTE
  config.data.synthetic.update(num_train=256, num_val=32, num_test=32)
  config.data.image_size = 64
  config.data.train_window = 128
  config.data.decode_threads = 2
  config.eval.stride = 40
  config.eval.batch_size = 64

  config.tokenizer.kind = 'bytes'
  config.model.vit.update(patch_size=8, width=64, depth=2, num_heads=2, pos_embed_grid=8,
                          layer_scale_init=None, taps=(1,))
  config.model.bottleneck_channels = 32
  config.model.decoder_channels = (16, 8, 8)
  config.model.embed_level = 1             # 16 x 16 map = 1/4 of the 64 x 64 crop, as 64 / 256 in GlaS
  config.model.embed_hidden = 32
  config.model.embed_dim = 32
  config.model.text.update(vocab_size=259, context_table=32, context_length=32, width=32, depth=1,
                           num_heads=2, embed_dim=32)

  config.train.labelled_batch_size = 8
  config.train.unlabelled_batch_size = 8
  config.train.steps = 800
  config.train.eval_every_steps = 200
  config.train.log_every_steps = 50
  config.train.learning_rate = 1e-3
  config.train.encoder_learning_rate = 1e-3  # random-init trunk: trained like the rest
  return config
