"""Library chatter a person should not have to read, turned off with the libraries' own switches.

Without it a CLI run, and the worker's lines in the bot's log, show transformers' notices (e.g. that torchvision is
not installed, which we do not need), the tqdm bars diffusers and transformers draw while loading a model, and the
`torch_dtype` deprecation that diffusers and transformers raise when a loading path still passes the old name on.
Errors still show, and so do download bars. With `--debug` or BOOTHBOT_LOG_LEVEL=debug nothing is changed.
"""
from __future__ import annotations

import os
import warnings


def quiet_libraries(debug: bool = False) -> None:
    """Call before the first model is loaded (the notices come once, at first use)."""
    if debug or os.environ.get("BOOTHBOT_LOG_LEVEL", "").strip().lower() == "debug":
        return
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else tokenizers warns in every forked process
    transformers_logging.set_verbosity_error()
    downloads_shown = not hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    if downloads_shown:
        hub_utils.enable_progress_bars()  # transformers' switch hides downloads too; a first download takes minutes
    warnings.filterwarnings("ignore", message=r"`torch_dtype` is deprecated", category=FutureWarning)
