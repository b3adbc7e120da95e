"""tvlens: mechanistic interpretability of task vectors.

Get a task vector (extracted, learned or adaptive), inject it at any layers and
positions, evaluate it, and explain its effect. The core, in one import::

    import tvlens
    model = tvlens.load_model()                       # SmolLM2-135M, embedded
    task = tvlens.load_task("antonym")
    print(tvlens.evaluate(model, task, shots=5))      # ICL accuracy with a 95% CI
    tv = tvlens.icl_task_vector(model, task, layers=12)
    print(tvlens.evaluate(model, task, vector=tv))    # zero-shot + task vector
    with tv.apply(model):                             # any forward or generate, no batch
        model.generate("hot ->", max_new_tokens=3)

The ground floor every method stands on: :class:`PromptSet` (the prompts, built once),
the interventions (:class:`ResidualEdit`, :class:`HeadPatch`, composed with ``+`` or
:class:`Compose`), :func:`run` (every forward, batched) and :class:`Accuracy` (a rate with
its interval). See CONTRIBUTING.md.
"""

import tvlens.progress  # noqa: F401  (first: tqdm.auto imported before any library that uses it)
from tvlens.compat import warn_if_untested
from tvlens.errors import TvlensError
from tvlens.evaluation import EvalResult, evaluate
from tvlens.extract import function_vector, icl_task_vector, layer_sweep, vanilla_task_vector
from tvlens.interventions import (Compose, HeadPatch, InjectionSpec, ResidualEdit, injected,
                                  injection_hooks, resid_hook_name)
from tvlens.learn import learn_task_vector
from tvlens.models import ModelFingerprint, fingerprint, list_models, load_model, tiny_model
from tvlens.prompts import (TEMPLATES, Example, PromptBatch, PromptSet, Template, make_examples,
                            tokenize)
from tvlens.runner import forward, run
from tvlens.stats import Accuracy
from tvlens.tasks import Task, builtin_task_names, load_task, load_task_file
from tvlens.vector import TaskVector

__version__ = "0.1.0"

warn_if_untested()

__all__ = [
    "TEMPLATES", "Accuracy", "Compose", "EvalResult", "Example", "HeadPatch", "InjectionSpec",
    "ModelFingerprint", "PromptBatch", "PromptSet", "ResidualEdit", "run",
    "Task", "TaskVector", "Template", "TvlensError", "builtin_task_names", "evaluate",
    "fingerprint", "forward", "function_vector", "icl_task_vector", "layer_sweep",
    "learn_task_vector", "vanilla_task_vector", "injected", "injection_hooks",
    "list_models", "load_model", "load_task", "load_task_file", "make_examples",
    "resid_hook_name", "tiny_model", "tokenize",
]
