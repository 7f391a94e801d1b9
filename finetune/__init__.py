"""finetune: the fine-tuning engine of the GPU-grant platform.

Importing the package puts the Hugging Face libraries in offline mode: the training environment
has no internet (PLATFORM.md, P7), and no code path may try to reach a hub.
"""

from finetune.offline import enforce_offline

__version__ = "0.1.0"

enforce_offline()
