"""The published DualProtoSeg setting as an `ml_collections.ConfigDict`.

Experiment files in `configs/` start from `dualprotoseg_config()` and change what differs. Every
hyper-parameter the code uses is here; the code has no other tunable numbers.
"""

from __future__ import annotations

import ml_collections

BCSS_CLASS_NAMES = ('TUM', 'STR', 'LYM', 'NEC')

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
BCSS_PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255))


def dualprotoseg_config() -> ml_collections.ConfigDict:
  """Full-size DualProtoSeg on BCSS-WSSS: CONCH ViT-B/16, 224 tiles, batch 64, 20 epochs, lr 5e-5."""
  config = ml_collections.ConfigDict()
  config.method = 'dualprotoseg'
  config.seed = 0

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
  config.data.mean = (0.66791496, 0.47791372, 0.70623304)
  config.data.std = (0.1736589, 0.22564577, 0.19820057)
  config.data.eval_split = 'val'           # split validated every epoch
  config.data.test_split = 'test'
  config.data.decode_threads = 8
  config.data.prefetch_batches = 2
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
  config.data.grain = ml_collections.ConfigDict()   # kind='records' only
  config.data.grain.worker_count = 0       # Grain worker processes (0 = decode in threads of this process)
  config.data.grain.worker_buffer_size = 2  # batches each worker prepares ahead
  config.data.grain.read_threads = 8       # threads per process, each decoding whole batches
  config.data.grain.prefetch_buffer_size = 16  # batches read ahead per process (>= read_threads)
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.hflip = True         # p = 0.5
  config.data.augment.vflip = True         # p = 0.5
  config.data.augment.rot90 = True         # k uniform in 0..3

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
  config.model.feature_dim = 512
  config.model.group_norm_groups = 16
  config.model.pyramid_channels = (256, 128, 64, 32)
  config.model.pyramid_upsample = (2, 4, 8, 16)
  config.model.logit_scale_init = 1.0 / 0.07
  config.model.image_prototype_init_std = 0.02
  config.model.vit = ml_collections.ConfigDict(dict(
      patch_size=16, width=768, depth=12, num_heads=12, mlp_ratio=4.0, pos_embed_grid=28,
      layer_norm_eps=1e-6, qkv_bias=True, class_token=True, layer_scale_init=None, activation='gelu',
      taps=(2, 5, 8, 11), pre_norm=False))
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

  # --- training ------------------------------------------------------------------------------------
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64
  config.train.epochs = 20
  config.train.learning_rate = 5e-5
  config.train.weight_decay = 1e-3         # not applied to biases and 1-D/0-D parameters
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
  config.train.compute_dtype = 'auto'      # 'auto' = bfloat16 on GPU/TPU, float32 on CPU
  config.train.log_every_steps = 50
  config.train.eval_every_epochs = 1
  config.train.max_steps = -1              # > 0 stops early (benchmarks, smoke runs)

  # --- checkpoints (protoseg_jax/checkpoints.py) ---------------------------------------------------
  # <workdir>/checkpoints/steps/<step>: train state + data iterator state, every `every_steps`, at each
  # validation and on preemption (SIGTERM); the last `keep` are kept. <workdir>/checkpoints/best/<step>:
  # trainable params of the best val mIoU. --mode=train resumes from the newest complete one.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 3
  config.checkpoint.async_save = True      # write in the background while training continues
  config.checkpoint.resume = True          # False = refuse to start when the workdir holds checkpoints

  # --- evaluation: CAM -> mask ---------------------------------------------------------------------
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 32
  config.eval.cam_level = 4                # 1-based pyramid level whose CAM becomes the mask
  config.eval.merge = 'max'
  config.eval.intensity_factors = (0.9, 1.0, 1.1)
  config.eval.hflip = True
  config.eval.tta_in_one_batch = True      # all TTA passes in one batch (fast); False = one at a time
  config.eval.background_power = 10.0
  config.eval.ignore_background = False    # True = older WSSS-Tissue protocol (drop BACK pixels)

  # --- predict -------------------------------------------------------------------------------------
  config.predict = ml_collections.ConfigDict()
  config.predict.input_dir = ''
  config.predict.output_dir = ''
  config.predict.overlay_alpha = 0.5

  # --- device mesh (protoseg_jax/sharding.py) ------------------------------------------------------
  # Axis sizes; -1 = the devices that remain. The batch is split over data x fsdp; fsdp also splits the
  # parameters and optimizer state; tensor splits heads / MLP / conv output channels.
  # e.g. --config.mesh.data=2 --config.mesh.fsdp=4 on 8 chips.
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})

  # --- sharding rules and multi-host ---------------------------------------------------------------
  config.sharding = ml_collections.ConfigDict()
  # Logical axis name -> mesh axis (or tuple of axes, or None = replicated), in priority order. A rule
  # applies to a dimension only if its mesh axes are still free in that array and divide the size (else
  # that dimension is replicated, logged). Parameter names: protoseg_jax.sharding.PARAM_AXES.
  config.sharding.logical_rules = (
      # activations
      ('batch', ('data', 'fsdp')),
      ('act_heads', 'tensor'),
      ('act_mlp', 'tensor'),
      ('act_embed', None),
      ('act_channels', None),
      ('length', None),
      ('prompts', None),
      # parameters: tensor parallelism splits the wide side of each matrix / conv outputs ...
      ('qkv', 'tensor'),
      ('heads', 'tensor'),
      ('mlp', 'tensor'),
      ('conv_out', 'tensor'),
      # ... FSDP the model width, conv inputs and the prototype space
      ('embed', 'fsdp'),
      ('conv_in', 'fsdp'),
      ('feature', 'fsdp'),
      # fallback: a width not split otherwise (token / position tables, prompt context) goes over tensor
      ('embed', 'tensor'),
      ('vocab', None),
      ('position', None),
      ('joint', None),
      ('prototypes', None),
      ('classes', None),
      ('context', None),
      ('vector', None),
  )
  # 'auto': jax.distributed.initialize() when the environment names several processes (coordinator
  # address, SLURM / Open MPI tasks, TPU worker list); 'on': always (multi-host TPU VMs); 'off': never.
  config.sharding.distributed = 'auto'
  config.sharding.coordinator_address = ''  # explicit multi-node set-up ('' = auto-detect)
  config.sharding.num_processes = -1
  config.sharding.process_id = -1

  return config
