"""Run configuration: TOML in, frozen dataclasses inside, JSON out.

A config is data, never code. Every key is checked: an unknown key, a wrong type or an
out-of-range value raises :class:`ConfigError` naming the key and what is allowed, before
anything is trained or written. ``--set section.key=value`` overrides are parsed as TOML
values, so ``--set train.epochs=3`` and ``--set model.params.widths=[128,128]`` both work.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config problem; the message names the key and what is allowed."""


def _check(allowed: str, ok):
    """Field metadata: a predicate plus the words that describe what is allowed."""
    return {"check": ok, "allowed": allowed}


def _one_of(*values):
    return _check("one of " + ", ".join(repr(v) for v in values), lambda v: v in values)


class _Validated:
    """``__post_init__`` checks every field's type and range, so a config built in Python
    (``TrainConfig(epochs=0)``) fails as a TOML one does, with the same message."""

    _section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            key = f"{self._section}.{f.name}" if self._section else f.name
            value, tp = getattr(self, f.name), hints[f.name]
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise ConfigError(f"{key}: expected a {tp.__name__}, got {type(value).__name__}")
                continue
            value = _coerce(value, tp, key)
            if "check" in f.metadata and not f.metadata["check"](value):
                raise ConfigError(f"{key}: {value!r} is out of range; allowed: {f.metadata['allowed']}")
            object.__setattr__(self, f.name, value)  # ints given for floats become floats


_POSITIVE = _check("an integer >= 1", lambda v: v >= 1)
_NON_NEGATIVE = _check(">= 0", lambda v: v >= 0)
_FRACTION = _check("a number in [0, 1]", lambda v: 0 <= v <= 1)


def _is_digits(text: str) -> bool:
    return text.strip().isascii() and text.strip().isdigit()


def _class_map(value: dict, key: str) -> dict:
    """A ``class_map`` table as {"<source>": target}: keys strings of digits, values ints >= 0.

    The range (< number of classes) is checked once the dataset is known (validate_semantics for
    the built-in datasets, run_chain for every dataset). Same rules as
    ``ban_analysis.data.label_noise.check_class_map``, repeated here to keep this module torch-free.
    """
    out = {}
    for src, dst in value.items():
        where = f"{key}.{src}"
        if isinstance(src, bool) or not (isinstance(src, int) or (isinstance(src, str) and _is_digits(src))):
            raise ConfigError(f"{where}: the source class must be an integer >= 0, written as a key such as \"7\"")
        if isinstance(src, int) and src < 0:
            raise ConfigError(f"{where}: the source class must be an integer >= 0")
        if isinstance(dst, str) and _is_digits(dst):
            dst = int(dst)
        if isinstance(dst, bool) or not isinstance(dst, int) or dst < 0:
            raise ConfigError(f"{where}: expected a target class, an integer >= 0; got {dst!r}")
        name = str(int(src))
        if name in out:
            raise ConfigError(f"{where}: class {name} is mapped twice")
        if int(src) == dst:
            raise ConfigError(f"{where}: maps class {name} to itself; leave it out of the map instead")
        out[name] = dst
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


@dataclass(frozen=True)
class LabelNoiseConfig(_Validated):
    """Synthetic noise on the training labels (ban_analysis.data.label_noise); rate 0 = off."""

    _section: ClassVar[str] = "data.label_noise"

    rate: float = field(default=0.0, metadata=_check("a number in [0, 1)", lambda v: 0 <= v < 1))
    kind: str = field(default="symmetric", metadata=_one_of("symmetric", "pair", "asymmetric"))
    seed: int = field(default=0, metadata=_NON_NEGATIVE)  # fixed, not the run seed: every seed sees the same labels
    class_map: dict = field(default_factory=dict)  # kind "asymmetric": source class -> target class

    def __post_init__(self) -> None:
        super().__post_init__()
        key = f"{self._section}.class_map"
        object.__setattr__(self, "class_map", _class_map(self.class_map, key))
        if self.class_map and self.kind != "asymmetric":
            raise ConfigError(f"{key}: applies only to kind 'asymmetric' (kind is {self.kind!r}); "
                              "remove it or set data.label_noise.kind = \"asymmetric\"")
        if self.kind == "asymmetric" and self.rate > 0 and not self.class_map:
            raise ConfigError(f"{key}: kind 'asymmetric' needs a class map, e.g. "
                              "class_map = {\"7\" = 1, \"2\" = 7, \"5\" = 6, \"6\" = 5, \"3\" = 8} (MNIST)")


@dataclass(frozen=True)
class DataConfig(_Validated):
    """Which dataset and how it is split and augmented (see ban_analysis.data)."""

    _section: ClassVar[str] = "data"

    name: str = "fashion_mnist"
    root: str = ""  # "" -> $BAN_DATA, then torchvision downloads into cache_dir
    val_size: int = field(default=5000, metadata=_NON_NEGATIVE)
    val_seed: int = 0  # fixed across seeds on purpose: every run selects on the same held-out set
    train_subset: int = field(default=0, metadata=_NON_NEGATIVE)  # 0 = every remaining train sample
    augment: str = field(default="none", metadata=_one_of("none", "flip", "crop_flip"))
    pad: int = field(default=4, metadata=_NON_NEGATIVE)
    image_size: int = field(default=0, metadata=_NON_NEGATIVE)  # 0 = native size (image folders)
    cache_dir: str = ""  # "" -> $BAN_CACHE or ~/.cache/ban_analysis
    label_noise: LabelNoiseConfig = field(default_factory=LabelNoiseConfig)  # train split only
    # "present_classes": test metrics over the classes the test split holds only (ImageWang's test
    # split is Imagewoof's 10 dog breeds out of 20 classes); "all": over every class
    test_scoring: str = field(default="all", metadata=_one_of("all", "present_classes"))


@dataclass(frozen=True)
class ModelConfig(_Validated):
    _section: ClassVar[str] = "model"
    arch: str = "mlp"
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherConfig(_Validated):
    """Generation 0. Empty arch = the students' architecture; a checkpoint skips training it."""

    _section: ClassVar[str] = "teacher"

    arch: str = ""
    params: dict = field(default_factory=dict)
    checkpoint: str = ""


@dataclass(frozen=True)
class TrainConfig(_Validated):
    """Optimisation, per generation. Defaults follow the WRN recipe the paper uses."""

    _section: ClassVar[str] = "train"

    epochs: int = field(default=15, metadata=_POSITIVE)
    batch_size: int = field(default=128, metadata=_POSITIVE)
    # 0 = auto, chosen for the device (engine.loop.eval_batch_size): CUDA 1024, else min(256, 2 * batch_size)
    eval_batch_size: int = field(default=0, metadata=_check("0 (auto) or an integer >= 1", lambda v: v >= 0))
    optimizer: str = field(default="sgd", metadata=_one_of("sgd", "adamw"))
    lr: float = field(default=0.1, metadata=_check("a number > 0", lambda v: v > 0))
    momentum: float = field(default=0.9, metadata=_check("a number in [0, 1)", lambda v: 0 <= v < 1))
    nesterov: bool = True
    weight_decay: float = field(default=5e-4, metadata=_NON_NEGATIVE)
    schedule: str = field(default="step", metadata=_one_of("step", "cosine", "constant"))
    # lr x gamma at these fractions of the epochs: 30/60/80% is the WRN recipe's 60/120/160 of 200
    milestones: list[float] = field(
        default_factory=lambda: [0.3, 0.6, 0.8],
        metadata=_check("fractions in (0, 1)", lambda v: all(0 < m < 1 for m in v)),
    )
    gamma: float = field(default=0.2, metadata=_check("a number in (0, 1]", lambda v: 0 < v <= 1))
    amp: str = field(default="off", metadata=_one_of("off", "auto", "bf16", "fp16"))
    channels_last: bool = False
    compile: bool = False
    # under torchrun (ban_analysis.engine.distributed): BatchNorm statistics over the global batch
    # (SyncBatchNorm, CUDA only); a single process ignores it
    sync_batchnorm: bool = False
    # checkpoint every this many epochs (and always at the end of a generation)
    checkpoint_every: int = field(default=1, metadata=_POSITIVE)
    # also keep the best-validation-accuracy epoch's val/test logits (one test prediction per
    # epoch that improves on the best so far); the generation's model stays the last epoch's
    track_best: bool = True


@dataclass(frozen=True)
class BanConfig(_Validated):
    """The chain: generations 1..K of students, each taught by the previous generation."""

    _section: ClassVar[str] = "ban"

    generations: int = field(default=2, metadata=_NON_NEGATIVE)
    objective: str = "ban"
    params: dict = field(default_factory=dict)  # objective hyperparameters
    ensemble_with_teacher: bool = False  # also report ensembles that include generation 0


TENSORBOARD_MISSING = "log.tensorboard needs the tensorboard package: pip install 'ban-analysis[tensorboard]'"


@dataclass(frozen=True)
class LogConfig(_Validated):
    """What a run reports besides its run folder's own files; never changes a number, so a
    resumed run may turn it on or off (RunDir.check_config ignores this section)."""

    _section: ClassVar[str] = "log"

    tensorboard: bool = False  # event files under <run>/tensorboard/gen-<k>/ (ban_analysis.engine.tracking)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError(TENSORBOARD_MISSING)


@dataclass(frozen=True)
class RunConfig(_Validated):
    _section: ClassVar[str] = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ban: BanConfig = field(default_factory=BanConfig)
    hooks: dict = field(default_factory=dict)  # hook name -> options table (ban_analysis.instrument.hooks)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp in (bool, str, dict) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return copy.deepcopy(value) if tp is dict else value


def build_section(cls, table: Mapping[str, Any], prefix: str = ""):
    """A config dataclass ``cls`` from a TOML table, every key checked; ``prefix`` names the section in errors.

    No cross-field or registry checks (those are :func:`validate_semantics`): a study plans run
    configs whose teacher checkpoint does not exist yet.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a table, got {table!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; "
                          f"allowed: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value, key)
            continue
        value = _coerce(value, tp, key)
        meta = known[name].metadata
        if "check" in meta and not meta["check"](value):
            raise ConfigError(f"{key}: {value!r} is out of range; allowed: {meta['allowed']}")
        kwargs[name] = value
    return cls(**kwargs)


def apply_override(table: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as TOML, bare words as strings)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.epochs=3")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as `ban.objective=dkpp`
    parts = key.split(".")
    node = table
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a table")
    node[parts[-1]] = value


def validate_semantics(cfg: RunConfig) -> None:
    """Cross-field checks that need the registries (objectives, models, hooks)."""
    from ban_analysis.losses import get_objective
    from ban_analysis.models import MODELS

    for key, arch in (("model.arch", cfg.model.arch), ("teacher.arch", cfg.teacher.arch)):
        if arch and arch not in MODELS:
            raise ConfigError(f"{key}: unknown architecture {arch!r}; allowed: {', '.join(sorted(MODELS))}")
    try:
        get_objective(cfg.ban.objective, **cfg.ban.params)
    except ValueError as err:
        raise ConfigError(f"ban.objective/ban.params: {err}") from None
    noise = cfg.data.label_noise
    if noise.class_map:
        from ban_analysis.data import DATASETS
        from ban_analysis.data.label_noise import check_class_map

        spec = DATASETS[cfg.data.name] if cfg.data.name in DATASETS else None
        if spec is not None and spec.kind == "array":  # an image folder's class count is known once read
            try:
                check_class_map(noise.class_map, spec.num_classes, key="data.label_noise.class_map")
            except ValueError as err:
                raise ConfigError(str(err)) from None
    if cfg.teacher.checkpoint and not Path(cfg.teacher.checkpoint).is_file():
        raise ConfigError(f"teacher.checkpoint: no such file {cfg.teacher.checkpoint!r}")
    if cfg.hooks:
        from ban_analysis.instrument.hooks import HookRunner

        try:
            # the real training indices are known only once the data is loaded (train.py);
            # 2**20 stands in so that option checks run without a spurious size warning
            runner = HookRunner(cfg.hooks, seed=cfg.seed, train_size=2**20)
        except ValueError as err:
            raise ConfigError(f"hooks: {err}") from None
        for name in runner.heldout_hooks():  # measured on the validation split
            if cfg.data.val_size == 0:
                raise ConfigError(f"hooks.{name}: measures a held-out loss on the validation split, but "
                                  "data.val_size = 0; set data.val_size > 0 or remove the hook")


def config_from_dict(table: Mapping[str, Any], overrides: list[str] | None = None) -> RunConfig:
    table = copy.deepcopy(dict(table))
    for assignment in overrides or []:
        apply_override(table, assignment)
    cfg = build_section(RunConfig, table, "")
    validate_semantics(cfg)
    return cfg


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML run config, apply ``--set`` overrides, validate everything."""
    return config_from_dict(read_toml(path), overrides)
