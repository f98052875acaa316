"""Test slides written directly with tifffile (independent of the package's own synthetic writer)."""

import numpy as np
import tifffile

GLASS = (243, 242, 240)
# Class colours painted on the test slides, far apart so nearest-colour decoding survives JPEG.
COLOURS = np.asarray([(200, 40, 60), (60, 170, 70), (50, 60, 190), (150, 60, 200), (230, 200, 40)], np.uint8)
NAMES = ('TUM', 'STR', 'LYM', 'NEC', 'BACK')
BACKGROUND = 4
GLASS_CELL = 255


def layout_image(layout: np.ndarray, cell: int) -> np.ndarray:
  """`[h, w]` layout (255 = glass) -> `[h * cell, w * cell, 3]` uint8 flat-colour image."""
  lut = np.zeros((256, 3), np.uint8)
  lut[:] = GLASS
  lut[:len(COLOURS)] = COLOURS
  return np.repeat(np.repeat(lut[layout], cell, axis=0), cell, axis=1)


def write_pyramid(path: str, image: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 128,
                  jpeg: bool = True, aperio: bool = False) -> None:
  """Tiled pyramidal TIFF of `image` (level k = every 2^k-th pixel), µm/px as resolution tags or Aperio."""
  compression = ('jpeg', {'level': 92}) if jpeg else ('zlib', None)
  with tifffile.TiffWriter(path) as writer:
    for k in range(levels):
      level = np.ascontiguousarray(image[::2 ** k, ::2 ** k])
      kwargs = dict(tile=(tile, tile), photometric='rgb', compression=compression[0],
                    compressionargs=compression[1], metadata=None, subfiletype=0 if k == 0 else 1)
      if aperio:
        kwargs.update(description=f'Aperio Image Library v12.0.0\r\n{image.shape[1]}x{image.shape[0]} '
                      f'({tile}x{tile}) JPEG/RGB|AppMag = 20|MPP = {mpp}', subfiletype=0)
      elif mpp is not None:
        per_cm = 1e4 / (mpp * 2 ** k)
        kwargs.update(resolution=(per_cm, per_cm), resolutionunit='CENTIMETER')
      writer.write(level, **kwargs)
      if aperio and k == 0:
        writer.write(np.ascontiguousarray(image[::16, ::16]), photometric='rgb', description='thumbnail',
                     metadata=None)


def nearest_colour_stub(calls: list | None = None):
  """scores_fn: one-hot of each pixel's nearest colour (glass -> BACKGROUND); logs batches in `calls`."""
  refs = COLOURS.astype(np.float32).copy()
  refs[BACKGROUND] = GLASS

  def scores_fn(tiles):
    if calls is not None:
      calls.append(tiles.copy())
    distance = ((tiles[..., None, :].astype(np.float32) - refs) ** 2).sum(-1)
    return np.eye(len(refs), dtype=np.float32)[distance.argmin(-1)]

  return scores_fn
