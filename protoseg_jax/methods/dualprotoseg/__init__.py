"""DualProtoSeg (weakly supervised, image-level labels): `config.method = 'dualprotoseg'`.

Files: `config.py` (published setting), `model.py` (refiner, pyramid, dual-modal prototype bank, CAM heads on
the shared towers), `cam.py` (CAM -> mask), `train.py` (losses, train step, per-pixel scores), `method.py`
(the core interface), `export.py` (`ClsNetwork`-named safetensors), `bench.py`, `baseline.py`.
"""

from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod

METHOD = DualProtoSegMethod
