"""SR methods behind one registry (BasicSR-style: name -> method, filled when the method modules import).

from baselines import registry
method = registry.build("esrgan", scale=16)        # random init, default config
method.load_checkpoint("RRDB_ESRGAN_x16.pth")       # official or our safetensors
sr = method.super_resolve(batch, Conditions())      # N x 3 x H x W in [0, 1]
"""
