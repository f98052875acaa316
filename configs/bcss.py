"""DualProtoSeg on BCSS-WSSS, the published setting (CONCH ViT-B/16, 224 tiles, batch 64, 20 epochs), with the
released code's behaviour (BGR input, weight decay on every tensor, RandomRotate90 p 0.5, the last partial
batch kept, bicubic anti-aliased position table, dense CRF on the test pass).

  python -m protoseg_jax.main --config=configs/bcss.py --workdir=/tmp/bcss \
      --config.data.root=/data/BCSS-WSSS --config.backbone.source=conch \
      --config.backbone.path=/models/conch/pytorch_model.bin \
      --config.tokenizer.path=/models/conch/tokenizer.json
"""

from protoseg_jax.methods.dualprotoseg import config as dualprotoseg_config


def get_config():
  return dualprotoseg_config.get_config()
