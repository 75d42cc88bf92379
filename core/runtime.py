"""Process-wide library behaviour: offline, and quiet where the noise is known to be harmless.

The project never needs the network at run time (real weights come from a local path or the HF
cache), so the Hugging Face libraries are put in offline mode before they are imported: a missing
file fails at once with a clear error instead of a hub lookup that hangs. Progress bars for loading
weights and writing parquet are silenced; warnings and errors still show.
"""

from __future__ import annotations

import os
import warnings

_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def configure_libraries() -> None:
    """Call once at process start, before transformers / datasets are imported. A user's own values win."""
    for key, value in {**_OFFLINE, **_QUIET}.items():
        os.environ.setdefault(key, value)
    # Known harmless: transformers' renames of gradient checkpointing arguments, used inside TRL.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
