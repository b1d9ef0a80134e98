"""ban_analysis: Born-Again Networks with per-sample gradient instrumentation and seed-level statistics.

The public API, importable from the top level::

    import ban_analysis as ba
    cfg = ba.load_config("experiments/quick.toml")
    summary = ba.run_chain(cfg, "runs/quick")

Names are resolved on first use (PEP 562), so ``import ban_analysis`` loads neither torch nor
pandas, and ``ban_analysis.report`` / ``ban_analysis.stats`` stay torch-free.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name -> the module that defines it
_API = {
    "load_config": "ban_analysis.config", "config_from_dict": "ban_analysis.config",
    "RunConfig": "ban_analysis.config", "TrainConfig": "ban_analysis.config", "DataConfig": "ban_analysis.config",
    "ConfigError": "ban_analysis.config",
    "Registry": "ban_analysis.registry",
    "load_dataset": "ban_analysis.data", "iterate_batches": "ban_analysis.data", "DATASETS": "ban_analysis.data",
    "create_model": "ban_analysis.models", "MODELS": "ban_analysis.models",
    "get_objective": "ban_analysis.losses", "OBJECTIVES": "ban_analysis.losses",
    "HookRunner": "ban_analysis.instrument", "HOOKS": "ban_analysis.instrument",
    "split_logit_grad": "ban_analysis.instrument", "per_sample_stats": "ban_analysis.instrument",
    "per_sample_term_grads": "ban_analysis.instrument",
    "train_step": "ban_analysis.engine.step", "as_objective": "ban_analysis.engine.step",
    "TrainingDiverged": "ban_analysis.engine.step",
    "train_generation": "ban_analysis.engine.loop", "run_chain": "ban_analysis.engine.chain",
    "RunDir": "ban_analysis.engine.runs",
    "run_study": "ban_analysis.study", "load_study_config": "ban_analysis.study",
    "StudyConfig": "ban_analysis.study",
    "load_study": "ban_analysis.report", "attribute": "ban_analysis.report", "write_report": "ban_analysis.report",
}
_RENAMED = {"load_study_config": "load_study"}  # the study package's load_study reads a TOML config

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'ban_analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
