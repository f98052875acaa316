"""The published DualProtoSeg setting (the authors' released code) as an `ml_collections.ConfigDict`.

Experiment files in `configs/` start from `get_config()` and change what differs. Every hyper-parameter the
method uses is here or in the shared schema (`protoseg_jax.config_base`); the code has no other tunable
numbers. Switches marked "reference" reproduce a quirk of the released PyTorch code (BUILD_NOTES.md,
"Parity with the reference code"); the alternative is named next to each.
"""

from __future__ import annotations

import ml_collections

from protoseg_jax import config_base
from protoseg_jax.data import bcss

BCSS_CLASS_NAMES = bcss.CLASS_NAMES

# The reference code's prompt phrases, class-major (TUM, STR, LYM, NEC), 10 per class.
BCSS_PHRASES = (
    ('invasive carcinoma', 'malignant epithelium', 'pleomorphic nuclei', 'solid tumor nests',
     'irregular glands', 'high nuclear grade', 'mitotic figures', 'desmoplastic reaction', 'angiogenesis',
     'tumor budding'),
    ('fibrous stroma', 'collagen bundles', 'spindle cells', 'hyalinized stroma', 'desmoplasia',
     'pink collagen', 'fibroblasts', 'loose connective tissue', 'myxoid stroma', 'scirrhous reaction'),
    ('lymphocytic infiltrate', 'TILs', 'plasma cells', 'lymphoid aggregates', 'peritumoral inflammation',
     'immune hotspot', 'macrophages', 'granulocytes', 'tertiary lymphoid structure',
     'chronic inflammation'),
    ('tumor necrosis', 'necrotic debris', 'ghost cells', 'comedo necrosis', 'karyorrhexis',
     'pink acellular areas', 'central necrosis', 'apoptotic bodies', 'nuclear dust', 'geographic necrosis'),
)

# BCSS-WSSS mask palette: TUM, STR, LYM, NEC, BACK.
BCSS_PALETTE = tuple(tuple(int(v) for v in colour) for colour in bcss.BCSS_PALETTE)


def get_config() -> ml_collections.ConfigDict:
  """Full-size DualProtoSeg on BCSS-WSSS: CONCH ViT-B/16, 224 tiles, batch 64, 20 epochs, lr 5e-5."""
  config = config_base.base_config('dualprotoseg')

  # --- data ----------------------------------------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  # 'folder' (BCSS-WSSS layout), 'records' (root = the output of `python -m protoseg_jax.data.convert`,
  # read with Grain) or 'synthetic' (written on demand).
  config.data.kind = 'folder'
  config.data.root = '/data/BCSS-WSSS'
  config.data.class_names = BCSS_CLASS_NAMES
  config.data.background_name = 'BACK'
  config.data.palette = BCSS_PALETTE
  config.data.image_size = 224
  config.data.mpp = 0.25                   # µm/px of the tiles (BCSS-WSSS: cut at 0.25 µm/px); slides
  # The reference reads tiles with OpenCV, so CONCH sees BGR (reference); 'rgb' = the order CONCH was
  # pretrained in. Applied wherever a tile becomes model input (train, eval, predict, slides, bench).
  config.data.channel_order = 'bgr'
  config.data.mean = (0.66791496, 0.47791372, 0.70623304)
  config.data.std = (0.1736589, 0.22564577, 0.19820057)
  config.data.eval_split = 'val'           # split validated every epoch
  config.data.test_split = 'test'
  config.data.decode_threads = 8
  config.data.prefetch_batches = 2
  # 'keep' (reference: no drop_last, 366 steps/epoch on 23,422 tiles; the last batch is padded and its
  # padding rows masked out of the loss, one compiled shape) | 'drop' (365 steps/epoch).
  config.data.last_partial_batch = 'keep'
  config.data.cache_in_memory = False      # decode every tile once and keep the uint8 arrays
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_train = 0
  config.data.synthetic.num_val = 0
  config.data.synthetic.num_test = 0
  config.data.synthetic.seed = 0
  config.data.synthetic.format = 'folder'  # 'records': also converted to <root>_records and read with Grain
  # 'device': the host ships uint8 tiles, the jitted step flips / rotates / normalises them (4x less
  # host->device traffic). 'host': Grain / the folder reader does it and ships normalised float32.
  config.data.augment_on = 'device'
  config.data.grain = ml_collections.ConfigDict()
  config.data.grain.worker_count = 0       # Grain worker processes (0 = decode in threads of this process)
  config.data.grain.worker_buffer_size = 2  # batches each worker prepares ahead
  config.data.grain.read_threads = 8       # threads per process, each decoding whole batches
  config.data.grain.prefetch_buffer_size = 16  # batches read ahead per process (>= read_threads)
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.hflip = True         # p = 0.5
  config.data.augment.vflip = True         # p = 0.5
  config.data.augment.rot90 = True
  # A.RandomRotate90 p (reference 0.5): k = randint(0, 3) with probability p, else 0, so P(k=0) = 0.625;
  # 1.0 = k uniform in 0..3.
  config.data.augment.rot90_prob = 0.5

  # --- tokenizer -----------------------------------------------------------------------------------
  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.kind = 'json'           # 'json' (a local tokenizer.json) or 'bytes' (built in)
  config.tokenizer.path = '/models/conch/tokenizer.json'
  config.tokenizer.bos_token = '<start_of_text>'
  config.tokenizer.eos_token = '<end_of_text>'
  config.tokenizer.lowercase = False

  # --- pretrained towers ---------------------------------------------------------------------------
  config.backbone = ml_collections.ConfigDict()
  # 'none'    random frozen towers drawn from config.seed (demo, tests only)
  # 'conch'   an open_clip CoCa checkpoint file (CONCH `pytorch_model.bin` / .safetensors): trunk under
  #           `visual.trunk.*`, text tower under `text.*`
  # 'hf_clip' a transformers CLIPModel folder (config.json + model.safetensors / pytorch_model.bin): PLIP,
  #           OpenAI CLIP; set config.model.vit.pre_norm=True, activation='quick_gelu' as its config says
  # 'timm'    a timm VisionTransformer state dict for the trunk (UNI-style); the text tower then comes
  #           from config.backbone.text_path (a 'conch' file or 'hf_clip' folder) or stays random if ''
  config.backbone.source = 'none'
  config.backbone.path = ''
  config.backbone.text_source = ''         # for source='timm': 'conch' | 'hf_clip' | '' (random text)
  config.backbone.text_path = ''
  config.backbone.checkpoint_key = ''      # dict key holding the state dict inside the file, '' = auto

  # --- model ---------------------------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.prompts_per_class = 10
  config.model.n_ctx = 16
  config.model.refiner_width = 256
  config.model.refiner_blocks = 8
  config.model.refiner_dropout = 0.1
  config.model.refiner_remat = True        # memory: recompute each block's norms in the backward pass
  config.model.feature_dim = 512
  config.model.group_norm_groups = 16
  config.model.pyramid_channels = (256, 128, 64, 32)
  config.model.pyramid_upsample = (2, 4, 8, 16)
  config.model.logit_scale_init = 1.0 / 0.07
  config.model.image_prototype_init_std = 0.02
  config.model.vit = ml_collections.ConfigDict(dict(
      patch_size=16, width=768, depth=12, num_heads=12, mlp_ratio=4.0, pos_embed_grid=28,
      layer_norm_eps=1e-6, qkv_bias=True, class_token=True, layer_scale_init=None, activation='gelu',
      taps=(2, 5, 8, 11), pre_norm=False, pos_embed_resample='bicubic_antialias'))
  config.model.text = ml_collections.ConfigDict(dict(
      vocab_size=32007, context_table=128, context_length=77, width=768, depth=12, num_heads=12,
      mlp_ratio=4.0, embed_dim=512, layer_norm_eps=1e-5, activation='gelu',
      causal_mask=False,   # reference quirk (bidirectional); True = CLIP's causal text tower
      pooling='last'))     # reference quirk (position L-1); 'eos' = CLIP's EOS pooling

  # --- prompts -------------------------------------------------------------------------------------
  config.prompts = ml_collections.ConfigDict()
  config.prompts.phrases = BCSS_PHRASES
  config.prompts.context_init = 'a histopathology image of'
  config.prompts.context_init_std = 0.02

  # --- training (length, cadence, precision: protoseg_jax.config_base) ----------------------------
  config.train.batch_size = 64
  config.train.epochs = 20
  config.train.eval_every_epochs = 1
  config.train.learning_rate = 5e-5
  config.train.weight_decay = 1e-3
  # 'all' (reference: train.py gives AdamW one flat list of every trainable tensor, biases, GroupNorm
  # affines and logit scales included) | 'matrices' (exempt biases and 0-D/1-D tensors, as the model's
  # never-called get_param_groups would).
  config.train.weight_decay_on = 'all'
  config.train.adam_b1 = 0.9
  config.train.adam_b2 = 0.999
  config.train.adam_eps = 1e-8
  config.train.poly_power = 1.0            # lr * (1 - t/T)^power, no warm-up
  config.train.level_loss_weights = (1.0, 1.0, 1.0, 1.0)
  config.train.merge = 'mean'              # prototype -> class merge of the training scores
  # Optional diversity term (Jeffreys divergence between a class's prototype maps, LPD-style); named in
  # the reference config but unused by its training loop, hence off.
  config.train.diversity_weight = 0.0
  config.train.diversity_level = 1         # 1-based pyramid level whose CAM it uses (1 = coarsest)

  # --- evaluation: CAM -> mask ---------------------------------------------------------------------
  config.eval.batch_size = 32
  config.eval.select_metric = 'mIoU'       # 'best' = the best val mIoU (tissue classes)
  config.eval.cam_level = 4                # 1-based pyramid level whose CAM becomes the mask
  config.eval.merge = 'max'
  config.eval.intensity_factors = (0.9, 1.0, 1.1)
  config.eval.hflip = True
  config.eval.tta_in_one_batch = True      # all TTA passes in one batch (fast); False = one at a time
  config.eval.background_power = 10.0
  config.eval.ignore_background = False    # True = older WSSS-Tissue protocol (drop BACK pixels)
  # 'nanmean' (classes with zero union are skipped) | 'reference' (plain mean: NaN if any class is absent
  # from both ground truth and prediction, as the reference reports it).
  config.eval.metric_means = 'nanmean'
  # Dense CRF refinement (pydensecrf, extra `[crf]`): 'test' (reference: its validate_test refines the test
  # pass, validation is not) | 'off' | 'always'. `--crf` / `--nocrf` override it for one --mode=eval run.
  config.eval.crf = 'test'
  config.eval.crf_workers = 2              # host processes running the CRF beside the device work

  # --- predict -------------------------------------------------------------------------------------
  # Image-level gating of an input without a label in its file name: 'none' (every class may be present) |
  # 'predicted' (the model's own image-level prediction, sigmoid(merged scores) > threshold).
  config.predict.gating = 'none'
  config.predict.gating_threshold = 0.5
  # Slides carry no image-level label: each tile's CAMs are gated by the model's own image-level prediction
  # ('predicted', sigmoid > threshold; a class the model does not see in the tile gets no map) | 'none'.
  config.slides.gating = 'predicted'
  config.slides.gating_threshold = 0.5

  # --- explanations (keys: protoseg_jax.config_base) -----------------------------------------------
  # Free phrases are compared with the pixel features of pyramid level 4 (full tile resolution, the level
  # whose CAM becomes the mask); the context in front of a phrase is config.prompts.context_init ('init').
  config.query.level = 4
  # Best patches per prototype at level 1 (s = 2 x patch grid: 28 x 28 cells of 8 px at 224).
  config.explain.level = 1
  return config
