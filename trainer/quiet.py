"""Library chatter a person should not have to read, turned off with the libraries' own switches.

Without it a CLI run, and the worker's lines in the bot's log, show transformers' notices (e.g. that torchvision is
not installed, which we do not need), the tqdm bars diffusers and transformers draw while loading a model, the
`torch_dtype` deprecation that diffusers and transformers raise when a loading path still passes the old name on, and
peft's cautions about the several adapters the worker keeps in one model. Errors still show, and so do download
bars. With `--debug` or BOOTHBOT_LOG_LEVEL=debug nothing is changed.
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
    # peft's cautions about several adapters in one model: the worker keeps its generation slot beside a training's
    # adapters and deletes the adapter each LoRA file is read through, on purpose (trainer/generation/lora_slots.py).
    warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute", category=UserWarning,
                            module="peft")
    warnings.filterwarnings("ignore", message=r"Adapter \S+ was active which is now deleted", category=UserWarning,
                            module="peft")
