"""Task-vector emergence: synthetic ICL tasks, from-scratch training, the TVP loss.

Train a small native transformer on synthetic in-context tasks with and without the
task-vector prompting loss, then measure where task vectors live::

    from tvlens.emergence import compare
    result = compare("tiny")          # two seeded runs, ~30 s of one CPU core
    result["with_tvp"]["tv_accuracy_by_layer"], result["without_tvp"]["tv_accuracy_by_layer"]

Modules, each importing only those above it: ``synthetic`` (vocabulary, tasks, sampling,
token-level prompts) → ``config`` (:class:`TVPConfig`, registered as method ``"tvp"``,
presets, the model) → ``measure`` (accuracies) and ``checkpoint`` (safetensors + JSON) →
``training`` (the losses, :func:`train`, :func:`compare`) → ``figures``.
"""

from tvlens.emergence.checkpoint import CHECKPOINT, load_model, read_checkpoint, save_checkpoint
from tvlens.emergence.config import PRESETS, TVPConfig, build_model, get_preset
from tvlens.emergence.measure import (
    evaluate_run, icl_accuracy, training_metrics, tv_accuracy_by_layer, zero_shot_accuracy,
)
from tvlens.emergence.synthetic import (
    FAMILIES, ICLBatch, SyntheticTask, Vocab, consistent_tasks, decode, encode,
    family_parameters, sample_batch, task_split, task_tables, token_prompt_batch, y_positions,
)
from tvlens.emergence.training import TrainRun, TVPOutput, compare, icl_loss, train, tvp_losses

__all__ = [
    "CHECKPOINT", "FAMILIES", "PRESETS", "ICLBatch", "SyntheticTask", "TVPConfig", "TVPOutput",
    "TrainRun", "Vocab", "build_model", "compare", "consistent_tasks", "decode", "encode",
    "evaluate_run", "family_parameters", "get_preset", "icl_accuracy", "icl_loss",
    "load_model", "read_checkpoint", "sample_batch", "save_checkpoint", "task_split",
    "task_tables", "token_prompt_batch", "train", "training_metrics", "tv_accuracy_by_layer",
    "tvp_losses", "y_positions", "zero_shot_accuracy",
]
