"""DualProtoSeg on BCSS-WSSS, the published setting (CONCH ViT-B/16, 224 tiles, batch 64, 20 epochs).

  python -m protoseg_jax.main --config=configs/bcss.py --workdir=/tmp/bcss \
      --config.data.root=/data/BCSS-WSSS --config.tokenizer.path=/models/conch/tokenizer.json
"""

from protoseg_jax import config_defaults


def get_config():
  return config_defaults.dualprotoseg_config()
