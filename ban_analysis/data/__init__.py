"""Data: datasets found by name, held in memory as uint8 tensors, batched on their device.

``datasets`` locates and loads (npz files, image folders, torchvision downloads), ``batches``
shuffles, crops, flips and normalises whole batches, ``imagefolder`` decodes and caches
ImageFolder trees. Import from here.
"""

from ban_analysis.data.datasets import *  # noqa: F401,F403
from ban_analysis.data.datasets import __all__  # noqa: F401
