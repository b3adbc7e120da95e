"""A word-level tokenizer for tiny native models.

Tiny TransformerLens-native models (``boot_native``) come without a tokenizer. For unit
tests and from-scratch training on string tasks we build a word-level Hugging Face
tokenizer over a given corpus: GPT-2-style byte-level pre-tokenization (so a word after
a space is its own token, ``" Paris"`` → ``"ĠParis"``), one id per distinct piece, and
the special tokens ``<pad>`` (0), ``<bos>`` (1), ``<unk>`` (2). BOS is prepended, like
the embedded models' tokenizers do.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>")


def word_tokenizer(texts: Iterable[str]):
    """Build a ``PreTrainedTokenizerFast`` whose vocabulary covers every piece of ``texts``.

    Args:
        texts: strings the tokenizer must encode without ``<unk>`` (prompts, answers).

    Returns:
        A tokenizer with ``len(tokenizer)`` = 3 special tokens + distinct pieces, left
        padding, and BOS prepended by its post-processor.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces: dict[str, None] = {}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            pieces.setdefault(piece, None)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))

    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
        add_bos_token=True,  # BOS comes from the post-processor; tells TransformerLens so
        name_or_path="tvlens-word-tokenizer",
    )
