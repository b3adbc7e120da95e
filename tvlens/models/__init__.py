"""Models: embedded GGUF models, Hugging Face models and tiny native models as bridges."""

from tvlens.models.loading import (
    ModelFingerprint,
    default_device,
    fingerprint,
    list_models,
    load_model,
    prepare_bridge,
    tiny_model,
)
from tvlens.models.registry import DEFAULT_MODEL, EMBEDDED_MODELS

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ModelFingerprint",
    "default_device",
    "fingerprint",
    "list_models",
    "load_model",
    "prepare_bridge",
    "tiny_model",
]
