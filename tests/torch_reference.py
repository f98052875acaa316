"""Independent PyTorch re-implementations used as referees in tests (torch is a test-only dependency).

Structured and named as the authors' PyTorch code (`ClsNetwork` with `shared_decoder`, `feature_pyramid`,
`proto_projections`, ...; the CONCH/open_clip text tower), written from the method description and the
structure of the authors' `src/model.py` / `src/conch_adapter.py`, so that a state dict exported by
`protoseg_jax.methods.dualprotoseg.export` must load into it with `strict=True`: it registers what the
reference registers (the CONCH model a second time under the prompt learner, the text-prototype buffers).
"""

import torch
import torch.nn.functional as F


def perturb_(module, seed):
  """Random weights everywhere (LayerNorm affines too), so no parameter is a silent identity."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for parameter in module.parameters():
      parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


class OpenClipBlock(torch.nn.Module):
  def __init__(self, width, heads, mlp_ratio=4.0):
    super().__init__()
    self.ln_1 = torch.nn.LayerNorm(width)
    self.attn = torch.nn.MultiheadAttention(width, heads)
    self.ln_2 = torch.nn.LayerNorm(width)
    self.mlp = torch.nn.Sequential()
    self.mlp.add_module('c_fc', torch.nn.Linear(width, int(width * mlp_ratio)))
    self.mlp.add_module('gelu', torch.nn.GELU())
    self.mlp.add_module('c_proj', torch.nn.Linear(int(width * mlp_ratio), width))

  def forward(self, x):  # [L, N, D]
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class OpenClipText(torch.nn.Module):
  """CONCH's text tower layout; forward as the reference prompt learner runs it (no mask, last position)."""

  def __init__(self, vocab, context, width, heads, layers, embed_dim, cls_emb=True):
    super().__init__()
    self.token_embedding = torch.nn.Embedding(vocab, width)
    self.positional_embedding = torch.nn.Parameter(torch.randn(context, width) * 0.01)
    self.transformer = torch.nn.Module()
    self.transformer.resblocks = torch.nn.ModuleList([OpenClipBlock(width, heads) for _ in range(layers)])
    self.ln_final = torch.nn.LayerNorm(width)
    self.text_projection = torch.nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
    if cls_emb:
      self.cls_emb = torch.nn.Parameter(torch.randn(width) * 0.01)

  def forward(self, ids, token_weight=None):
    """`token_weight`: a replacement token table (the reference prompt learner's spliced one)."""
    weight = self.token_embedding.weight if token_weight is None else token_weight
    x = F.embedding(ids, weight) + self.positional_embedding[:ids.shape[1]]
    x = x.permute(1, 0, 2)
    for block in self.transformer.resblocks:
      x = block(x)
    x = x.permute(1, 0, 2)
    return self.ln_final(x[:, -1]) @ self.text_projection


class FeatureRefiner(torch.nn.Module):
  def __init__(self, in_channels, out_channels, depth, base_ch, groups):
    super().__init__()
    self.proj = torch.nn.Sequential(torch.nn.Conv2d(in_channels, base_ch, 1, bias=False),
                                    torch.nn.GroupNorm(groups, base_ch), torch.nn.SiLU())
    self.blocks = torch.nn.ModuleList([torch.nn.Sequential(
        torch.nn.Conv2d(base_ch, base_ch, 3, padding=1, bias=False), torch.nn.GroupNorm(groups, base_ch),
        torch.nn.SiLU(), torch.nn.Dropout2d(0.1), torch.nn.Conv2d(base_ch, base_ch, 3, padding=1, bias=False),
        torch.nn.GroupNorm(groups, base_ch)) for _ in range(depth)])
    self.skips = torch.nn.ModuleList([torch.nn.Conv2d(base_ch, base_ch, 1) for _ in range(depth)])
    self.final = torch.nn.Sequential(torch.nn.Conv2d(base_ch, out_channels, 1, bias=False),
                                     torch.nn.GroupNorm(groups, out_channels))

  def forward(self, x):
    x = self.proj(x)
    for block, skip in zip(self.blocks, self.skips):
      x = F.silu(block(x) + skip(x))
    return F.normalize(self.final(x), dim=1)


class MultiscaleFeaturePyramid(torch.nn.Module):
  def __init__(self, in_channels, target_sizes, target_channels, groups):
    super().__init__()
    self.target_sizes = target_sizes
    self.projections = torch.nn.ModuleList([torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, ch, 1, bias=False), torch.nn.GroupNorm(groups, ch), torch.nn.SiLU(),
        torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False), torch.nn.GroupNorm(groups, ch), torch.nn.SiLU())
        for ch in target_channels])

  def forward(self, features):
    return [F.interpolate(projection(feature), size=size, mode='bilinear', align_corners=False)
            for feature, size, projection in zip(features, self.target_sizes, self.projections)]


class ClsNetwork(torch.nn.Module):
  """The DualProtoSeg network; `trunk` is a timm ViT, `text` an `OpenClipText` with the extended vocabulary.

  As the reference: `ConchPromptLearner` keeps the CONCH model as `self.model_conch` (registered a second
  time, `clip_adapter.prompt_learner.model_conch.*`, the same modules as `clip_adapter.model.*`), and
  `ClsNetwork` registers the buffers `prototypes` `[C*M, E]` / `class_prototypes` `[C, E]` (its
  construction-time `clip_adapter.encode_text(normalize=True)`; here zeros of those shapes, filled by
  `load_state_dict`).
  """

  def __init__(self, trunk, text, taps, num_classes, prompts_per_class, n_ctx, feature_dim, refiner_width,
               refiner_blocks, groups, pyramid_channels, target_sizes, visual_proj_dim=512):
    super().__init__()
    vit_width, text_width = trunk.embed_dim, text.token_embedding.embedding_dim
    self.taps = list(taps)
    self.clip_adapter = torch.nn.Module()
    self.clip_adapter.model = torch.nn.Module()
    self.clip_adapter.model.visual = torch.nn.Module()
    self.clip_adapter.model.visual.trunk = trunk
    self.clip_adapter.model.text = text
    self.clip_adapter.prompt_learner = torch.nn.Module()
    self.clip_adapter.prompt_learner.model_conch = self.clip_adapter.model
    self.clip_adapter.prompt_learner.ctx = torch.nn.Parameter(torch.zeros(num_classes, n_ctx, text_width))
    self.num_classes, self.n_ctx = num_classes, n_ctx
    embed_dim = text.text_projection.shape[1]
    self.register_buffer('prototypes', torch.zeros(num_classes * prompts_per_class, embed_dim))
    self.register_buffer('class_prototypes', torch.zeros(num_classes, embed_dim))
    self.clip_adapter.visual_proj = torch.nn.Linear(vit_width, visual_proj_dim)
    self.text_proj = torch.nn.Linear(text.text_projection.shape[1], feature_dim)
    self.learnable_image_prototypes = torch.nn.Parameter(torch.zeros(num_classes * prompts_per_class,
                                                                     feature_dim))
    self.global_img_proj = torch.nn.Linear(feature_dim, feature_dim, bias=False)
    self.contrastive_temperature = torch.nn.Parameter(torch.tensor(0.1))
    for level in range(len(pyramid_channels)):
      setattr(self, f'logit_scale{level + 1}', torch.nn.Parameter(torch.ones([]) / 0.07))
    self.shared_decoder = FeatureRefiner(vit_width, feature_dim, refiner_blocks, refiner_width, groups)
    self.feature_pyramid = MultiscaleFeaturePyramid(feature_dim, target_sizes, pyramid_channels, groups)
    self.proto_projections = torch.nn.ModuleList([torch.nn.Linear(feature_dim, c, bias=False)
                                                  for c in pyramid_channels])

  def encode_text(self, prompt_ids, ctx=None):
    """The reference's `ConchAdapter.encode_text(normalize=True)`: the token table with the class contexts
    `ctx` `[C, n_ctx, D]` (default: the learned `prompt_learner.ctx`) in the appended rows, the text tower on
    the soft-prompt ids -> (unit features `[C*M, E]`, unit per-class means of them `[C, E]`)."""
    ctx = self.clip_adapter.prompt_learner.ctx if ctx is None else torch.as_tensor(ctx)
    text = self.clip_adapter.model.text
    start = text.token_embedding.num_embeddings - self.num_classes * self.n_ctx
    weight = torch.cat([text.token_embedding.weight[:start], ctx.reshape(-1, ctx.shape[-1])], dim=0)
    features = F.normalize(text(prompt_ids, weight), dim=-1)
    class_features = features.reshape(self.num_classes, -1, features.shape[-1]).mean(dim=1)
    return features, F.normalize(class_features, dim=-1)

  def prototype_bank(self, prompt_ids):
    text_features = F.normalize(self.clip_adapter.model.text(prompt_ids), dim=-1)
    text_prototypes = F.normalize(self.text_proj(text_features), dim=-1)
    image_prototypes = F.normalize(self.learnable_image_prototypes, dim=-1)
    bank = torch.stack([text_prototypes, image_prototypes], dim=1).reshape(-1, text_prototypes.shape[1])
    return F.normalize(bank, dim=-1)

  def forward(self, images, prompt_ids):
    """images `[B, 3, H, W]` normalised, prompt ids with the soft-token ids -> scores `[L, B, P]`."""
    trunk = self.clip_adapter.model.visual.trunk
    unique = sorted(set(self.taps))
    maps = trunk.forward_intermediates(images, indices=unique, norm=False, output_fmt='NCHW',
                                       intermediates_only=True)
    by_index = dict(zip(unique, maps))
    refined = [self.shared_decoder(by_index[tap]) for tap in self.taps]
    pyramid = [F.normalize(level, dim=1) for level in self.feature_pyramid(refined)]
    bank = self.prototype_bank(prompt_ids)
    scores = []
    for level, features in enumerate(pyramid):
      prototypes = F.normalize(self.proto_projections[level](bank), dim=-1)
      cam = getattr(self, f'logit_scale{level + 1}') * torch.einsum('bchw,pc->bphw', features, prototypes)
      scores.append(cam.mean(dim=(2, 3)))
    return torch.stack(scores)


def soft_prompt_ids(prompt_ids, vocab_size, num_classes, n_ctx):
  """Our prompt ids (context slots 1..n_ctx hold a placeholder) -> the reference's ids, whose context
  slots name the C * n_ctx tokens its prompt learner appends to the vocabulary."""
  ids = torch.as_tensor(prompt_ids).clone()
  per_class = ids.shape[0] // num_classes
  for row in range(ids.shape[0]):
    start = vocab_size + (row // per_class) * n_ctx
    ids[row, 1:1 + n_ctx] = torch.arange(start, start + n_ctx)
  return ids


def conv_bn_relu(in_channels, out_channels, kernel_size=3):
  """TransUNet's `Conv2dReLU`: conv (no bias), BatchNorm2d, ReLU."""
  return torch.nn.Sequential(
      torch.nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
      torch.nn.BatchNorm2d(out_channels), torch.nn.ReLU(inplace=True))


class DecoderBlock(torch.nn.Module):
  def __init__(self, in_channels, out_channels):
    super().__init__()
    self.conv1 = conv_bn_relu(in_channels, out_channels)
    self.conv2 = conv_bn_relu(out_channels, out_channels)
    self.up = torch.nn.UpsamplingBilinear2d(scale_factor=2)  # align_corners=True

  def forward(self, x):
    return self.conv2(self.conv1(self.up(x)))


class DecoderCup(torch.nn.Module):
  def __init__(self, hidden, bottleneck, channels):
    super().__init__()
    self.conv_more = conv_bn_relu(hidden, bottleneck)
    ins = [bottleneck] + list(channels[:-1])
    self.blocks = torch.nn.ModuleList([DecoderBlock(i, o) for i, o in zip(ins, channels)])

  def forward(self, x, tap_level):
    x, tapped = self.conv_more(x), None
    for index, block in enumerate(self.blocks):
      x = block(x)
      if index + 1 == tap_level:
        tapped = x
    return x, tapped


class TransUNetUni(torch.nn.Module):
  """MPAMatch's segmenter as TransUNet's PyTorch code names it (pure-ViT variant, timm UNI trunk), plus the
  pixel-embedding head and the text side; the layout `protoseg_jax.mpamatch.export` writes."""

  def __init__(self, trunk, text, hidden, bottleneck, channels, num_classes, embed_level, embed_hidden,
               embed_dim, n_ctx, text_width):
    super().__init__()
    self.encoder, self.embed_level = trunk, embed_level
    self.decoder = DecoderCup(hidden, bottleneck, channels)
    self.segmentation_head = torch.nn.Sequential(torch.nn.Conv2d(channels[-1], num_classes, 3, padding=1))
    tapped_channels = channels[embed_level - 1]
    self.embed_head = torch.nn.Sequential(
        torch.nn.Conv2d(tapped_channels, embed_hidden, 1, bias=False), torch.nn.BatchNorm2d(embed_hidden),
        torch.nn.ReLU(inplace=True), torch.nn.Conv2d(embed_hidden, embed_dim, 1))
    self.text_encoder = text
    self.prompt_learner = torch.nn.Module()
    self.prompt_learner.ctx = torch.nn.Parameter(torch.zeros(num_classes, n_ctx, text_width))
    self.text_adapter = torch.nn.Linear(embed_dim, embed_dim)

  def forward(self, images):  # [B, 3, H, W] -> logits [B, C, H, W], unit embeddings [B, E, h, w]
    tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]
    side = int(round(tokens.shape[1] ** 0.5))
    features = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    x, tapped = self.decoder(features, self.embed_level)
    return self.segmentation_head(x), F.normalize(self.embed_head(tapped), dim=1)
