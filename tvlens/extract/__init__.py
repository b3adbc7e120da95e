"""Extracted task vectors: read off ICL activations (Hendel's task vectors, ...)."""

from tvlens.extract.icl_tv import icl_task_vector

__all__ = ["icl_task_vector"]
