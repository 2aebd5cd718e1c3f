"""Load a local Hugging Face MoE checkpoint and its tokenizer for tracing.

Everything the user can get wrong is a `UserError` raised before any heavy work: a missing
folder, a folder that is not a checkpoint, a model type with no MoE layers, a tokenizer whose
ids do not fit the model's vocabulary, `device=cuda` without CUDA. Nothing is downloaded
(`local_files_only=True`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sim.errors import UserError
from sim.tracer.families import Family, MoELayer, family_for

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class Loaded:
    """A model ready for tracing: eval mode, parameters frozen, MoE layers found."""

    model: nn.Module
    tokenizer: Any
    config: Any
    family: Family
    layers: list[MoELayer]  # the MoE blocks, in decoder order
    num_decoder_layers: int
    input_device: torch.device  # where input ids go
    dtype: str
    name: str  # checkpoint folder name (never an absolute path)


def resolve_device(device: str, device_map: str) -> str | None:
    """Validate `device` / `device_map`; returns the device string for a single-device load."""
    if device_map not in ("", "auto"):
        raise UserError(f"device_map must be 'auto' or empty, got {device_map!r}")
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise UserError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if (
        (device.startswith("cuda") or device_map == "auto")
        and device != "cpu"
        and not torch.cuda.is_available()
    ):
        raise UserError(f"device={device} was requested but CUDA is not available on this machine")
    return None if device_map == "auto" else device


def load(
    model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu", device_map: str = ""
) -> Loaded:
    """Load `model_dir` (config, weights, tokenizer) for tracing. Raises UserError on bad input."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model folder not found: {model_dir}")
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    single = resolve_device(device, device_map)
    if not (path / "config.json").is_file():
        raise UserError(f"{path.name} is not a Hugging Face checkpoint: config.json is missing")

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path.name}: cannot read config.json: {_first_line(err)}") from None
    family = family_for(config, where=path.name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{path.name}: cannot load the tokenizer: {_first_line(err)}") from None
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": DTYPES[dtype]}
    if single is None:
        kwargs["device_map"] = "auto"
    if dtype == "float64":  # the default grouped_mm experts kernel has no float64 path
        kwargs["experts_implementation"] = "eager"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"{path.name}: cannot load the model weights: {_first_line(err)}") from None
    if single is not None:
        model.to(single)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    layers = family.moe_layers(model)
    if not layers:
        raise UserError(f"{path.name}: {config.model_type} checkpoint has no MoE layers to trace")
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if len(tokenizer) > vocab:
        raise UserError(
            f"{path.name}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}"
        )
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        config=config,
        family=family,
        layers=layers,
        num_decoder_layers=len(family.decoder_layers(model)),
        input_device=model.get_input_embeddings().weight.device,
        dtype=dtype,
        name=path.resolve().name,
    )


def check_length(loaded: Loaded, tokens: int) -> None:
    """Refuse sequences longer than the model's `max_position_embeddings` (when it has one)."""
    limit = getattr(loaded.config, "max_position_embeddings", None)
    if limit and tokens > int(limit):
        raise UserError(
            f"{loaded.name}: prompt_tokens + decode_tokens = {tokens} exceeds the model's "
            f"max_position_embeddings = {limit}"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
