"""MPAMatch, published setting: UNI ViT-L/16 TransUNet, UniMatch loop + image/text prototype contrast,
1/8 of the training images labelled, 256 x 256 crops, 8 labelled + 8 unlabelled, 15 k iterations.

  python -m protoseg_jax.main --config=configs/glas_semi.py --workdir=/runs/glas_1_8 \
      --config.data.root=/data/GlaS --config.tokenizer.path=/models/conch/tokenizer.json
  # other datasets of the paper: --config=configs/glas_semi.py:ebhi_gland | ebhi_cancer | kpi
  # label fraction: --config.data.labelled_fraction=0.25 (1/4) or 0.5 (1/2); the split file is
  # <workdir>/split_<fraction>_seed<split_seed>.json unless --config.data.split_file is given.
  # ablation: --config.loss.variant=unimatch (no prototypes) | supervised (labelled images only)

Pretrained weights (local files; nothing is downloaded): this config loads UNI from
`config.backbone.path` (timm state dict) and CONCH's text tower from `config.backbone.text_path`; set
`--config.backbone.source=none --config.backbone.text_source=` for random towers.
"""

from protoseg_jax.methods.mpamatch import config as mpamatch_config

PRESETS = ('glas', 'ebhi_gland', 'ebhi_cancer', 'kpi')


def get_config(dataset: str = 'glas'):
  if dataset not in PRESETS:
    raise ValueError(f'configs/glas_semi.py:<dataset> must be one of {PRESETS}, got {dataset!r} (config)')
  config = mpamatch_config.get_config()
  config.data.class_names = mpamatch_config.CLASS_NAMES[dataset]
  config.backbone.source = 'timm'
  config.backbone.path = '/models/uni/pytorch_model.bin'
  config.backbone.text_source = 'conch'
  config.backbone.text_path = '/models/conch/pytorch_model.bin'
  if dataset == 'glas':
    # Warwick QU folder: train_XX.bmp / train_XX_anno.bmp, testA_*, testB_*. Images ~775 x 522: the host
    # cuts 512 x 512 windows so that the 0.5x rescale still fills a 256 crop; test by sliding window.
    config.data.kind = 'glas'
    config.data.root = '/data/GlaS'
    config.data.train_window = 512
    config.data.mpp = 0.62005              # GlaS: "20X (0.62005 µm/pixel)", Zeiss MIRAX MIDI
  elif dataset.startswith('ebhi'):
    config.data.kind = 'ebhi'
    config.data.root = '/data/EBHI-SEG'
    config.data.ebhi_subset = dataset.split('_')[1]
    config.data.resize_to = 256            # 224 -> 256 (scored back at 224)
    config.data.train_window = 256
    config.data.test_split = 'test'
    config.data.mpp = 0.0                  # not published (Shi et al. 2023): set it for --mode=slides
  else:
    # KPIs 2024 task 1: 2048 x 2048 PAS patches, downsampled x0.25 to 512; JPEG masks thresholded at 127.
    config.data.kind = 'kpi'
    config.data.root = '/data/KPIs24'
    config.data.resize_to = 512
    config.data.train_window = 512
    config.data.mask_threshold = 127
    config.data.eval_split = 'val'         # the official validation folder
    config.data.test_split = 'val'         # the challenge's test set is not public
    config.data.mpp = 0.0                  # not in the challenge text: read it off the WSIs for slides
  return config
