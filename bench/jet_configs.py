"""The two Jet train-step benchmark settings, for bench/jet.py and both reference timings.

Kinds (channels, channels, spatial) throughout. Imports nothing, so that
bench/ref_pytorch.py can read it from an environment without JAX.
"""

CONFIGS = {
    "J-small": dict(image=32, batch=32, ps=4, depth=8, block_depth=2, emb_dim=256, num_heads=4),
    "J-64": dict(image=64, batch=16, ps=4, depth=16, block_depth=2, emb_dim=256, num_heads=4),
}
