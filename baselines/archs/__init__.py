"""Network architectures buildable from `{type: ClassName, ...}` (BasicSR's pattern).

Importing this package registers every architecture in `baselines.registry.ARCHS`.
"""

from .discriminator import VGGStyleDiscriminator
from .rrdbnet import RRDBNet
from .swinir import SwinIR

__all__ = ["RRDBNet", "SwinIR", "VGGStyleDiscriminator"]
