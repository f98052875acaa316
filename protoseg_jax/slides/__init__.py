"""Method-agnostic whole-slide inference: slides in, class masks, polygons and areas out.

The model is a plain callable `scores_fn(tiles uint8 [B, S, S, 3]) -> float32 [B, S, S, K]`; this package
knows no method. Entry points: `run_slides`, `expand_inputs`, `slides_config`, `bench_slide`,
`synthetic.write_synthetic_slide`. Reading and writing slides needs the `slides` extra (tifffile,
imagecodecs, shapely, scikit-image); OpenSlide-only formats need the `openslide` extra.
"""

from protoseg_jax.slides.config import slides_config

__all__ = ['bench_slide', 'expand_inputs', 'run_slides', 'slides_config', 'SlidesReport', 'write_summary_csv']


def __getattr__(name):
  # Lazy: importing the package (for `slides_config`) must not need the extras.
  if name in ('run_slides', 'expand_inputs', 'SlidesReport'):
    from protoseg_jax.slides import run
    return getattr(run, name)
  if name == 'write_summary_csv':
    from protoseg_jax.slides import outputs
    return outputs.write_summary_csv
  if name == 'bench_slide':
    from protoseg_jax.slides import bench
    return bench.bench_slide
  raise AttributeError(name)
