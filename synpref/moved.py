"""Module paths from before the core/, reporting/ and pipeline/ subpackages import their new homes."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# Old path -> new path: user code, configs' class paths and pickled objects in checkpoints written
# before the regroup keep loading (the module object is the new one, under both names).
MOVED = {
    "synpref.errors": "synpref.core.errors",
    "synpref.secrets": "synpref.core.secrets",
    "synpref.resources": "synpref.core.resources",
    "synpref.outputs": "synpref.core.outputs",
    "synpref.specs": "synpref.core.specs",
    "synpref.fingerprints": "synpref.core.fingerprints",
    "synpref.console": "synpref.core.console",
    "synpref.chat": "synpref.core.chat",
    "synpref.batching": "synpref.core.batching",
    "synpref.models": "synpref.core.models",
    "synpref.qwen_tokenizer": "synpref.core.qwen_tokenizer",
    "synpref.logprobs": "synpref.core.logprobs",
    "synpref.losses": "synpref.core.losses",
    "synpref.tracking": "synpref.core.tracking",
    "synpref.optimizers": "synpref.core.optimizers",
    "synpref.lineage": "synpref.core.lineage",
    "synpref.metrics": "synpref.core.metrics",
    "synpref.stats": "synpref.core.stats",
    "synpref.pairs": "synpref.core.pairs",
    "synpref.compare": "synpref.reporting.compare",
    "synpref.report": "synpref.reporting.report",
    "synpref.replies": "synpref.reporting.replies",
    "synpref.study_report": "synpref.reporting.study_report",
    "synpref.estimate": "synpref.reporting.estimate",
    "synpref.invocation": "synpref.pipeline.invocation",
    "synpref.lightning_cli": "synpref.pipeline.lightning_cli",
    "synpref.stages": "synpref.pipeline.stages",
    "synpref.stage_process": "synpref.pipeline.stage_process",
    "synpref.services": "synpref.pipeline.services",
    "synpref.grid": "synpref.pipeline.grid",
    "synpref.pair_stage": "synpref.pipeline.pair_stage",
    "synpref.parent_run": "synpref.pipeline.parent_run",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import machinery set the alias's spec on the shared module: give it back its own.
        module.__spec__ = self.own_spec


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds `synpref.errors` (say) as `synpref.core.errors`."""

    def find_spec(self, name, path=None, target=None):
        new = MOVED.get(name)
        return importlib.util.spec_from_loader(name, _Alias(new)) if new else None


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())  # before editable installs of an older checkout
