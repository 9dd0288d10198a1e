"""vllm-flashprefill: block-sparse prefill attention as a vLLM V1 attention backend."""

import os as _os

# kernels/ and patches/ sit at the repository top level and are installed as subpackages of this
# one (setup.py package_dir). Run from a source checkout (its root first on sys.path, as with
# `python -m` or a script started from there), find them in the checkout too.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_checkout, "kernels", "attention.py")
):
    __path__.append(_checkout)

from .config import FlashPrefillConfig  # noqa: E402
from .registration import BACKEND_NAME, register  # noqa: E402

__all__ = ["BACKEND_NAME", "FlashPrefillConfig", "register"]
