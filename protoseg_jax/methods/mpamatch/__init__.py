"""MPAMatch (semi-supervised segmentation with image- and text-prototype pixel contrast on the UniMatch loop):
`config.method = 'mpamatch'`.

Files: `config.py` (published setting, presets in `configs/glas_semi.py`), `model.py` (UNI TransUNet,
embedding head, text side), `augment.py` (weak / strong views, CutMix), `losses.py`, `prototypes.py` (EMA
bank), `train.py` (the step, scores), `data.py` (labelled / unlabelled batches), `method.py` (the core
interface), `export.py` (TransUNet / timm names), `bench.py`.
"""

from protoseg_jax.methods.mpamatch.method import MPAMatchMethod

METHOD = MPAMatchMethod
