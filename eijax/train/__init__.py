"""S-SFT training: layered configs, sharded jit step, gate-only optax, grain data, orbax checkpoints.

Entry point: `python train.py [experiment.yaml] [key=value ...]` (see configs/ and README).
"""
