"""The interface between the core and a segmentation method.

The core (`trainer`, `checkpoints`, `sharding`, `evaluation`, `inference`, `predict`, `exporting`, `bench`,
`main`) knows no method. A method is a package `protoseg_jax/methods/<name>/` (or any importable module)
whose `METHOD` attribute is a `Method` subclass; `registry.get(config.method)` finds it. A method supplies:

* its model and static inputs (built in `__init__` from the config),
* `init_variables` / `frozen_params`: parameters (frozen towers loaded from local files) and mutable
  non-differentiated state (`extra`: BatchNorm statistics, a prototype bank; `{}` if none),
* `optimizer`, and `train_step_fn`: the pure `(TrainState, batch, rng) -> (TrainState, metrics)` the core
  jits on the mesh,
* `param_axes`: logical axis names of its own parameters (the shared towers' are the core's),
* `train_data` / `eval_set`: host-side data built with the core's pipeline and readers,
* `scores_fn` (+ `inference_statics`): per-pixel class scores of fixed-size tiles, which the core turns into
  confusion matrices (evaluation), stitched masks (predict, slides) and metrics (`summarize`),
* `export`: PyTorch-loadable files, and `bench_workloads` for `python -m protoseg_jax.bench`.

Shapes: B batch, S tile size (`config.data.image_size`), K mask values (classes incl. background), C the
classes of image-level labels (`num_label_classes`).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Optional, Protocol, Sequence

import flax
import jax
import ml_collections
import numpy as np
import optax

from protoseg_jax.errors import ConfigError

Params = dict
Batch = Mapping[str, np.ndarray]
StepFn = Callable[['TrainState', Any, jax.Array], tuple['TrainState', dict]]
# scores_fn(params, extra, statics, images uint8 [B, S, S, 3], labels int32 [B, C]) -> [B, S, S, K] f32;
# labels: 1/0 where the image-level label is known, -1 where it is not (the method decides what to do).
ScoresFn = Callable[[Params, Any, Any, jax.Array, jax.Array], jax.Array]
INFERENCE_CONTEXTS = ('eval', 'predict', 'slides')
# Explanations (optional capabilities, `protoseg_jax.explaining`); Q phrases, P prototypes, h x w features:
# query_fn(params, extra, statics, phrase_ids int32 [Q, L], images uint8 [B, S, S, 3]) -> cosine [B, h, w, Q]
QueryFn = Callable[[Params, Any, Any, jax.Array, jax.Array], jax.Array]
# patch_similarities_fn(params, extra, statics, images uint8 [B, S, S, 3]) -> cosine [B, h, w, P] f32
PatchFn = Callable[[Params, Any, Any, jax.Array], jax.Array]
# prototype_map_fn(params, extra, statics, images, labels [B, C]) -> int32 [B, S, S]: the winning prototype of
# each pixel's predicted class (`explain.prototype_map`), -1 where the pixel is of no explained class.
PrototypeMapFn = Callable[[Params, Any, Any, jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  `trainable` is differentiated and optimised; `frozen` (pretrained towers) is carried, never updated, and
  not checkpointed (rebuilt from `config.backbone`); `extra` is the method's non-differentiated mutable
  state (checkpointed); `nonfinite_step` is the first step whose loss was NaN/Inf (-1: none), after which
  the core's guard keeps the state unchanged.
  """

  step: jax.Array
  trainable: Any
  frozen: Any
  extra: Any
  opt_state: Any
  nonfinite_step: jax.Array

  @property
  def params(self) -> Params:
    return {**self.frozen, **self.trainable}


class DataIterator(Protocol):
  """Host-local training batches with a JSON-serialisable state (restored exactly after preemption)."""

  def __next__(self) -> dict: ...
  def get_state(self) -> dict: ...
  def close(self) -> None: ...


@dataclasses.dataclass
class TrainData:
  """A method's training input on this host.

  `iterator(state)` yields host batches (dicts of arrays). With `host_rows` each host yields its own rows
  of every global batch (`global rows = rows x process_count`); otherwise every host yields the whole batch.
  `steps_per_epoch` is None for methods that count in steps only.
  """

  num_examples: int
  steps_per_epoch: Optional[int]
  images_per_step: int
  host_rows: bool
  make_iterator: Callable[[Optional[dict]], DataIterator]

  def iterator(self, state: Optional[dict] = None) -> DataIterator:
    return self.make_iterator(state)


@dataclasses.dataclass
class EvalSet:
  """An evaluation split: images (uint8 `[H, W, 3]`, any size), masks (uint8 `[h, w]` values 0..K-1, 255 =
  not scored; may be smaller/larger than the image: scores are resized to the mask), and known image-level
  labels `[N, C]` (-1 = unknown). With `per_host` this host holds only examples p, p + P, ... of the split
  (`num_examples` counts them all); otherwise every host holds the whole split."""

  names: list[str]
  images: Sequence[np.ndarray]
  masks: Sequence[np.ndarray]
  labels: np.ndarray
  num_examples: int
  per_host: bool = False


@dataclasses.dataclass
class ImageSource:
  """Random access to a split's images for explanation passes (`--mode=prototypes`): `read(i)` -> (uint8
  `[H, W, 3]` image of any size, int32 `[C]` image-level label, -1 = unknown). Every host reads all of it."""

  names: list[str]
  read: Callable[[int], tuple[np.ndarray, np.ndarray]]

  def __len__(self) -> int:
    return len(self.names)


@dataclasses.dataclass(frozen=True)
class Workload:
  """One program of `python -m protoseg_jax.bench`: `fn(*args)` (args may be `jax.ShapeDtypeStruct`s for
  compile-only accounting; `make_args()` gives real inputs for timing) processing `images` images per call.
  `donate` marks a train step whose first argument is donated (the bench feeds its output back)."""

  name: str
  fn: Callable
  abstract_args: tuple
  make_args: Callable[[], tuple]
  images: int
  donate: bool = False


class Method(abc.ABC):
  """Base class of a method package's `METHOD`. Built once per run from the full config."""

  name: ClassVar[str] = ''
  # Top-level parameter collections that are frozen (never differentiated, not checkpointed).
  frozen_collections: ClassVar[tuple[str, ...]] = ()

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @classmethod
  @abc.abstractmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The method's published setting; also the schema user configs are checked against."""

  # --- labels and values ---------------------------------------------------------------------------
  @property
  @abc.abstractmethod
  def value_names(self) -> list[str]:
    """Names of the K mask values, in value order (e.g. TUM, STR, LYM, NEC, BACK)."""

  @property
  def palette(self) -> np.ndarray:
    """`[K, 3]` uint8 colours of the mask values."""
    return np.asarray(self.config.data.palette, np.uint8)

  @property
  @abc.abstractmethod
  def background_value(self) -> int:
    """The mask value of background / non-tissue."""

  @property
  def num_label_classes(self) -> int:
    """C: entries of an image-level label vector (the labels passed to `scores_fn`)."""
    return len(self.config.data.class_names)

  # --- model ---------------------------------------------------------------------------------------
  @abc.abstractmethod
  def param_axes(self) -> Sequence[tuple[str, tuple]]:
    """`(path regex, logical axis names)` of the method's own parameters (`sharding.TOWER_PARAM_AXES`)."""

  @abc.abstractmethod
  def init_variables(self, rng: jax.Array) -> tuple[Params, Any]:
    """-> (all parameters, frozen towers loaded from `config.backbone`; extra state)."""

  def frozen_params(self, rng: jax.Array) -> Params:
    """The frozen towers exactly as `init_variables(rng)` builds them (restores need nothing else)."""
    params, _ = self.init_variables(rng)
    return {key: value for key, value in params.items() if key in self.frozen_collections}

  def abstract_variables(self, rng: jax.Array) -> tuple[Params, Any]:
    """Shapes/dtypes (`jax.ShapeDtypeStruct`) of `init_variables(rng)`, without computing it."""
    return jax.eval_shape(self.random_variables, rng)

  @abc.abstractmethod
  def random_variables(self, rng: jax.Array) -> tuple[Params, Any]:
    """Randomly initialised (params, extra), no files read (jittable; for shapes and the bench)."""

  def split_params(self, params: Params) -> tuple[Params, Params]:
    """-> (trainable, frozen) by top-level collection."""
    frozen = {k: v for k, v in params.items() if k in self.frozen_collections}
    return {k: v for k, v in params.items() if k not in self.frozen_collections}, frozen

  @abc.abstractmethod
  def optimizer(self, trainable: Params,
                total_steps: int) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """-> (optimizer of the trainable params (masks / labels as trees built from `trainable`, which may be
    `ShapeDtypeStruct`s), named learning-rate schedules for the logs)."""

  @abc.abstractmethod
  def train_step_fn(self, optimizer: optax.GradientTransformation,
                    schedules: dict[str, optax.Schedule]) -> StepFn:
    """The pure train step. Its metrics must include 'loss' (checked for NaN/Inf by the core)."""

  def extra_axes(self, extra: Any) -> Any:
    """Logical axis names of the extra state's leaves (default: all replicated)."""
    return jax.tree.map(lambda leaf: (None,) * np.ndim(leaf), extra)

  # --- data ----------------------------------------------------------------------------------------
  @abc.abstractmethod
  def train_data(self, workdir: str, process_index: int, process_count: int) -> TrainData:
    """This host's training input (files validated here, before anything compiles)."""

  @abc.abstractmethod
  def eval_set(self, workdir: str, split: str, process_index: int, process_count: int) -> EvalSet:
    """Split `split` ('val', 'test', ...) for evaluation."""

  # --- inference -----------------------------------------------------------------------------------
  def inference_statics(self, params: Params, extra: Any) -> Any:
    """Values every `scores_fn` call shares, computed once per evaluation (e.g. a prototype bank)."""
    del params, extra
    return ()

  @abc.abstractmethod
  def scores_fn(self, context: str) -> ScoresFn:
    """Pure per-pixel class scores of tiles for `context` in `INFERENCE_CONTEXTS` (argmax = mask value)."""

  def scores_to_probs(self, scores: np.ndarray) -> np.ndarray:
    """`[..., K]` scores -> probabilities (for the CRF's unary); default: they already are."""
    return scores

  def crf_image(self, tile: np.ndarray) -> np.ndarray:
    """uint8 `[H, W, 3]` RGB tile -> the uint8 image the dense CRF's bilateral term sees (default: itself)."""
    return tile

  def image_labels(self, path: str) -> np.ndarray:
    """Known image-level label `[C]` of an input file for predict (-1 entries: unknown)."""
    del path
    return np.full((self.num_label_classes,), -1, np.int32)

  @abc.abstractmethod
  def summarize(self, confusion: np.ndarray, per_image: np.ndarray) -> dict:
    """Metrics from the split's `[K, K]` confusion and the `[N, K, K]` per-image ones (JSON-serialisable)."""

  def format_metrics(self, metrics: dict) -> str:
    from protoseg_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    return metrics_lib.format_metrics_table(metrics)

  # --- explanations (optional: --mode=query, --mode=prototypes, config.predict.prototype_map) -------
  def _no_text_side(self) -> ConfigError:
    return ConfigError(f'--mode=query: method {self.name or type(self).__name__!r} has no text side')

  def _no_prototypes(self) -> ConfigError:
    return ConfigError(f'--mode=prototypes / config.predict.prototype_map: method '
                       f'{self.name or type(self).__name__!r} has no prototypes')

  def query_tokenizer(self) -> tuple[Any, int]:
    """-> (tokenizer with `encode(text) -> ids`, the most ids a phrase may take: the text tower's context
    minus what the method adds around it), for `explain.query.format_phrases`."""
    raise self._no_text_side()

  def phrase_token_ids(self, prompts: Sequence[str]) -> np.ndarray:
    """`[Q, L]` int32 token ids of the free prompts, laid out as the method's class prompts are."""
    raise self._no_text_side()

  def query_fn(self) -> QueryFn:
    """Pure cosine maps of free phrases (`QueryFn`) at `config.query.level`, the phrases through the same text
    path as a class prompt. Checks `config.query` (context, level) when called (one-line `ConfigError`)."""
    raise self._no_text_side()

  def query_level_name(self) -> str:
    """What `config.query.level` is, for the outputs (e.g. 'pyramid level 4')."""
    return str(self.config.query.level)

  def prototype_infos(self) -> list:
    """`explain.prototype_map.PrototypeInfo` of every prototype, in bank order (class-major groups)."""
    raise self._no_prototypes()

  def patch_similarities_fn(self) -> PatchFn:
    """Pure cosine of every position with every prototype at `config.explain.level` (`PatchFn`)."""
    raise self._no_prototypes()

  def prototype_map_fn(self, context: str) -> PrototypeMapFn:
    """Pure prototype maps of tiles for `context` in `INFERENCE_CONTEXTS` (gating as `scores_fn(context)`)."""
    raise self._no_prototypes()

  def explain_images(self, workdir: str, split: str) -> ImageSource:
    """Split `split` for `--mode=prototypes`; default: the whole evaluation split held in memory."""
    eval_set = self.eval_set(workdir, split, 0, 1)
    labels = np.asarray(eval_set.labels, np.int32)
    return ImageSource(list(eval_set.names), lambda index: (eval_set.images[index], labels[index]))

  # --- export and bench ----------------------------------------------------------------------------
  @abc.abstractmethod
  def export(self, params: Params, extra: Any, out_dir: str) -> dict[str, str]:
    """Writes PyTorch-loadable files into `out_dir` (a fresh temporary folder); -> {kind: path}."""

  def bench_workloads(self, what: Sequence[str], batch_size: Optional[int] = None) -> list[Workload]:
    """Programs to account for / time in `python -m protoseg_jax.bench` (`what`: 'train', 'inference'...)."""
    del what, batch_size
    return []


def check_context(context: str) -> None:
  if context not in INFERENCE_CONTEXTS:
    raise ValueError(f'inference context must be one of {INFERENCE_CONTEXTS}, got {context!r}')

