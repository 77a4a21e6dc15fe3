"""The Jet train-step benchmark settings, for bench/jet.py and both reference timings.

Imports nothing, so that bench/ref_pytorch.py can read it from an environment
without JAX.
"""

KINDS = ("channels", "channels", "spatial")
PAPER_KINDS = ("channels",) * 4 + ("spatial",)

CONFIGS = {
    "J-small": dict(kinds=KINDS, image=32, batch=32, ps=4, depth=8, block_depth=2, emb_dim=256, num_heads=4),
    "J-64": dict(kinds=KINDS, image=64, batch=16, ps=4, depth=16, block_depth=2, emb_dim=256, num_heads=4),
    # The offline demo's model and batch (configs/photo_patches_jet.py).
    "J-demo": dict(kinds=KINDS, image=32, batch=64, ps=4, depth=16, block_depth=1, emb_dim=64, num_heads=2),
    # The paper's ImageNet 64x64 Jet (configs/imagenet64_jet.py) at a batch that fills one GPU.
    "J-paper": dict(image=64, batch=256, ps=4, depth=32, block_depth=2, emb_dim=512,
                    num_heads=8, kinds=PAPER_KINDS),
}
