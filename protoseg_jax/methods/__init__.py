"""One package per method; each exposes `METHOD`, a `protoseg_jax.method.Method` subclass, and is found by
name through `protoseg_jax.registry` (`config.method`). The core never imports these packages directly."""
