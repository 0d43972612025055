"""Configs: YAML recipes -> dotted overrides -> a validated, fully resolved `Config`.

Sections `method`, `backbone`, `data` and `views` are registry specs ({name, **constructor
parameters}; `data` also takes `classes` and `fraction`, for any dataset: data/selection.py);
`optim`, `train` and `eval` are the dataclasses below, whose defaults and comments are the only
statement of those defaults. Unknown keys fail with the valid keys and a close match.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from selfsup.data.selection import SELECTION_KEYS, check_selection
from selfsup.methods.base import SUPPLIED
from selfsup.params import (
    BELOW_ONE,
    FINITE_POSITIVE,
    FRACTION,
    GROUP_LIMITS,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Group,
    Limit,
    check_limits,
)
from selfsup.registry import BACKBONES, DATASETS, METHODS, VIEWS, Registry, parameters, suggest
from selfsup.target import TARGET_SETTINGS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adamw | lars
    lr: float = 0.3  # base learning rate, for a batch of 256 when lr_scaling is "linear"
    lr_scaling: str = "linear"  # linear: lr × batch_size / 256 (SimCLR, MoCo v3, BYOL); none
    batch_size: int = 256
    weight_decay: float = 1e-6
    final_weight_decay: float | None = None  # cosine from weight_decay to this; None: constant
    # False: norms and biases (parameters with ndim <= 1) get no weight decay and no LARS
    # adaptation (SimCLR, BYOL); true: everything is decayed (MoCo's and SimSiam's code)
    decay_norms_and_biases: bool = False
    momentum: float = 0.9  # sgd / lars momentum
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    warmup_epochs: float = 10.0  # linear warm-up, then cosine decay to final_lr
    final_lr: float = 0.0
    # after warm-up: cosine, or linear (Li et al. 2020, "Budgeted Training", arXiv 1905.04753:
    # linear decay to zero is the better schedule when a budget sets the length), to final_lr;
    # or constant
    schedule: str = "cosine"
    clip: float | None = None  # max gradient norm; None: no clipping
    lars_eta: float = 0.001  # LARS trust coefficient (You et al. 2017); other optimisers: unused
    # LARC's clip mode (solo-learn's `clip_lr`): a layer's step is min(eta·||w||/||u||, lr)
    lars_clip: bool = False
    # parameter-name prefix -> its own lr, fixed lr, weight decay (schedule), frozen epochs;
    # replaces the method's group of that prefix (selfsup/params.py)
    groups: dict[str, Group] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 100.0
    # a wall-clock budget instead: the epochs are chosen from the throughput of the first steps,
    # every schedule in epochs (method.*, backbone.*, views.*, optim.*, optim.groups.*.* named
    # *_epochs or *_epoch) is multiplied by chosen / these epochs, longer or shorter, and both
    # are written to the run's config.yaml, which replays the run (engine/budget.py)
    budget_minutes: float | None = None
    max_steps: int | None = None  # stop after this many steps (the schedule still spans `epochs`)
    # [k, n]: a budget's re-plan from the loop's steady step time (engine/budget.py): from step k
    # on, the rest of the schedules planned over `epochs` runs over n - k steps; the run is n
    # steps long. Written by the budget into config.yaml, so the run replays exactly.
    replan: tuple[int, ...] | None = None
    seed: int = 0
    # the target branch (arXiv 2112.05141 Table 2; selfsup/target.py): method: as the paper;
    # stop_gradient: the online network, detached (an EMA target becomes such a copy); momentum: an
    # EMA of the online network (a method with its own EMA keeps it: the same as method)
    target: str = "method"
    # m₀ of that EMA where train.target adds one (SimCLR, SimSiam, Barlow Twins, VICReg), ramped
    # to 1 on a cosine: UniGrad's code (configs base_momentum 0.996, pretrainer.adjust_mm)
    target_momentum: float = 0.996
    init: str | None = None  # run folder whose encoder a fine-tuning method starts from
    teacher: str | None = None  # run folder of the classifier a distillation method learns from
    # semi-supervised: train on this class-balanced fraction of the labelled training images
    # (SimCLR §B.5: 0.01, 0.1), chosen with `seed`; None: all of them (selfsup/data/subsets.py)
    label_fraction: float | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    channels_last: bool = True  # ~1.35x faster convolutions on CPU
    compile: bool = False  # torch.compile the backbone; off: no faster on CPU (docs/benchmarks.md)
    # under torchrun: BatchNorm over the global batch of all processes (SimCLR §2.2 "Global BN")
    # instead of each process's part; torch's SyncBatchNorm on CUDA, selfsup.dist's on CPU
    sync_bn: bool = False
    # micro-batches per optimizer step: optim.batch_size is run in this many parts, each
    # process's share split further; losses over the whole batch stay exact (gradient caching,
    # selfsup/engine/accumulate.py); BN statistics are per micro-batch
    accumulate: int = 1
    threads: int | None = None  # torch intra-op threads; None: torch's default
    checkpoint_minutes: float = 5.0  # save checkpoints/last.pt at least this often (and each epoch)
    log_every: int = 20  # steps between metric lines in metrics.jsonl
    # where every number of metrics.jsonl also goes: one name or a list of jsonl (metrics.jsonl,
    # always written), tensorboard (<run>/tensorboard) and mlflow (<run>/mlruns, or
    # MLFLOW_TRACKING_URI when set); each but jsonl is an extra: pip install "selfsup[tensorboard]"
    # (engine/loggers.py)
    loggers: str | tuple[str, ...] = ("jsonl",)
    knn_every: float = 1.0  # epochs between online kNN monitor evaluations; 0 disables
    # steps between gradient decompositions of the loss (arXiv 2112.05141) logged to metrics.jsonl;
    # 0 disables (engine/monitor.py GradientMonitor)
    gradients_every: int = 0
    out_dir: str = "runs"
    name: str | None = None  # run folder name; None: <method>-<dataset>-<time>
    progress: bool = True  # progress bar on stderr
    # log embed_std / embed_rank and stop a run whose representation collapsed (engine/collapse.py)
    collapse_guard: bool = True


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = 200  # InstDisc's weighted kNN (Wu et al. 2018)
    knn_temperature: float = 0.07
    # subtract the training features' mean before the cosine (SimpleShot's "CL2N", Wang et al.
    # 2019, arXiv 1911.04623), as the raw-pixel baseline always does; off: InstDisc's raw cosine
    knn_center: bool = False
    monitor_train: int = 10000  # bank size of the online kNN monitor (a fixed subset of train)
    monitor_test: int = 2000  # test images used by the online monitor
    linear_epochs: int = 100  # L-BFGS iterations of the linear probe (each ~one pass over the data)
    # the probe's L2 penalty: one value, or candidates chosen from on a held-out part of train
    linear_weight_decay: float | tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    linear_val_fraction: float = 0.1
    batch_size: int = 512  # feature extraction batch
    test_split: str = "test"


# Allowed values of the numeric settings: a bad one fails when the config is read, not mid-run.
# Those of the method, backbone and views parameters are in params.py (PARAMETER_LIMITS).
LIMITS: dict[type, dict[str, Limit]] = {
    OptimConfig: {
        # as a parameter group's, which overrides them (params.py)
        **{name: GROUP_LIMITS[name] for name in ("lr", "weight_decay", "final_weight_decay")},
        "batch_size": POSITIVE,
        "momentum": BELOW_ONE,
        "warmup_epochs": NON_NEGATIVE,
        "final_lr": NON_NEGATIVE,
        "clip": POSITIVE,
        "lars_eta": POSITIVE,
    },
    TrainConfig: {
        "epochs": FINITE_POSITIVE,
        "budget_minutes": FINITE_POSITIVE,
        "max_steps": POSITIVE,
        "replan": POSITIVE,
        "accumulate": POSITIVE,
        "threads": POSITIVE,
        "checkpoint_minutes": POSITIVE,
        "log_every": POSITIVE,
        "knn_every": NON_NEGATIVE,
        "gradients_every": NON_NEGATIVE,
        "label_fraction": FRACTION,
        "target_momentum": UNIT,
    },
    EvalConfig: {
        "knn_k": POSITIVE,
        "knn_temperature": POSITIVE,
        "monitor_train": POSITIVE,
        "monitor_test": POSITIVE,
        "linear_epochs": POSITIVE,
        "linear_weight_decay": NON_NEGATIVE,
        "linear_val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
        "batch_size": POSITIVE,
    },
}


def _check_limits(section: str, value: Any) -> None:
    limits = LIMITS.get(type(value), {})
    check_limits(section, {key: getattr(value, key) for key in limits}, limits)


SECTIONS: dict[str, Registry | type] = {
    "method": METHODS,
    "backbone": BACKBONES,
    "data": DATASETS,
    "views": VIEWS,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
# Values the engine passes to registry entries itself; a recipe may not set them.
ENGINE_SUPPLIED = {
    "method": set(SUPPLIED),
    "backbone": {"in_channels", "image_size"},
    "data": {"split"},
}


@dataclass(frozen=True)
class Config:
    method: dict[str, Any]
    backbone: dict[str, Any]
    data: dict[str, Any]
    views: dict[str, Any]
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for name in SECTIONS:
            value = getattr(self, name)
            out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return _plain(out)

    def replace(self, overrides: list[str]) -> Config:
        return resolve(apply_overrides(self.to_dict(), overrides))


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so configs dump to plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_root() -> Path:
    return Path(str(resources.files("selfsup") / "recipes"))


def recipe_names() -> list[str]:
    root = recipe_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.yaml"))


def recipe_summary(name: str) -> str:
    """First comment line of a recipe."""
    for line in (recipe_root() / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """A recipe by name (`simclr/fashion_mnist`) or by path to a YAML file, as a raw dict."""
    path = Path(name_or_path)
    if not path.is_file():
        path = recipe_root() / f"{str(name_or_path).removesuffix('.yaml')}.yaml"
    if not path.is_file():
        names = recipe_names()
        raise FileNotFoundError(
            f"no recipe file or name '{name_or_path}'{suggest(str(name_or_path), names)}; "
            f"recipes: {', '.join(names)} (or give a path to a YAML file)"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:  # syntax, or a tag that safe_load refuses (!!python/...)
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(
            f"{path}{line}: not a valid recipe ({problem}); recipes are plain YAML mappings "
            f"of sections (no Python tags)"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the recipe ({error})") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping of sections")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw config dict.

    An override that names another entry of a registry section (`backbone.name=vit_tiny` on a
    ResNet recipe, `method.name=byol` on a SimCLR one) replaces the whole section with that
    entry's defaults, and says which settings it dropped; the section's other overrides apply on
    top of it, whatever their order on the command line."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    named = [i for i in overrides if _is_new_name(raw, i)]
    for item in named:
        section, _, text = item.partition(".name=")
        dropped = {k: v for k, v in raw[section].items() if k != "name"}
        raw[section] = {}
        if dropped:
            log.info(
                "%s replaces the %s section (%s's defaults apply); dropped: %s",
                item,
                section,
                text,
                ", ".join(f"{section}.{k}={v}" for k, v in dropped.items()),
            )
    for item in named + [i for i in overrides if i not in named]:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(
                f"override '{item}' must look like section.key=value, e.g. optim.lr=0.1; "
                f"sections: {', '.join(SECTIONS)}"
            )
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ValueError(
                f"unknown config section '{section}'{suggest(section, list(SECTIONS))}; "
                f"valid: {', '.join(SECTIONS)}"
            )
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as error:
            raise ValueError(
                f"override '{item}': the value is not valid YAML ({error.__class__.__name__}); "
                f"quote it, e.g. {key}='\"{text}\"'"
            ) from error
        target = raw.setdefault(section, {})
        prefix, dot, field_name = name.removeprefix("groups.").rpartition(".")
        if section == "optim" and name.startswith("groups.") and dot:
            # optim.groups.<parameter-name prefix>.<field>: the prefix may hold dots itself
            groups = target["groups"] = dict(target.get("groups") or {})
            groups[prefix] = {**(groups.get(prefix) or {}), field_name: value}
        else:
            target[name] = value
    return raw


def _is_new_name(raw: dict[str, Any], item: str) -> bool:
    """Whether override `item` names another entry of a registry section than `raw` has."""
    key, sep, text = item.partition("=")
    section, dot, name = key.partition(".")
    if not (sep and dot and name == "name" and isinstance(SECTIONS.get(section), Registry)):
        return False
    current = raw.get(section)
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return False  # apply_overrides says what is wrong with it
    return isinstance(current, dict) and current.get("name") != value


def resolve(raw: dict[str, Any]) -> Config:
    """Validate a raw dict against the registries and dataclasses; fill in every default."""
    import selfsup.augment  # noqa: F401  (registers VIEWS)
    import selfsup.backbones  # noqa: F401
    import selfsup.data.datasets  # noqa: F401
    import selfsup.methods  # noqa: F401

    unknown = set(raw) - set(SECTIONS)
    if unknown:
        name = sorted(unknown)[0]
        raise ValueError(
            f"unknown config section '{name}'{suggest(name, list(SECTIONS))}; "
            f"valid: {', '.join(SECTIONS)}"
        )
    values: dict[str, Any] = {}
    for section, kind in SECTIONS.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise ValueError(f"config section '{section}' must be a mapping, got {given!r}")
        if isinstance(kind, Registry):
            values[section] = _resolve_spec(section, kind, given)
        else:
            values[section] = _resolve_dataclass(section, kind, given)
    _check_label_fraction(values["method"]["name"], values["train"].label_fraction)
    _check_target(values["method"]["name"], values["train"].target)
    _check_small_views(values["method"]["name"], values["views"])
    if values["optim"].lars_clip and values["optim"].name != "lars":
        raise ValueError(
            f"optim.lars_clip=true clips LARS's layer-wise rate, and optim.name="
            f"{values['optim'].name} has none; set optim.name=lars or leave optim.lars_clip false"
        )
    values["train"] = dataclasses.replace(
        values["train"], loggers=check_loggers(values["train"].loggers)
    )
    return Config(**values)


def _check_label_fraction(method: str, fraction: float | None) -> None:
    def uses_labels(name: str) -> bool:
        return getattr(METHODS.get(name), "uses_labels", False)

    if fraction is not None and not uses_labels(method):
        takers = [n for n in METHODS.names() if uses_labels(n)]
        raise ValueError(
            f"train.label_fraction={fraction} keeps a fraction of the labels, and method "
            f"'{method}' trains on no labels (methods that do: {', '.join(takers)}); leave "
            f"train.label_fraction unset"
        )


def _check_small_views(method: str, views: dict[str, Any]) -> None:
    """A view set with small (multi-crop) views only for a method that trains on them."""

    def uses_small(name: str) -> bool:
        return getattr(METHODS.get(name), "uses_small_views", False)

    if uses_small(method):
        return
    # the view set's num_small, given or its default (views without one make none); read, not
    # built, so a bad value of another view setting is left to that setting's own check
    default = parameters(VIEWS.get(views["name"])).get("num_small")
    small = views.get("num_small", default.default if default is not None else 0)
    if small:
        takers = [n for n in METHODS.names() if uses_small(n)]
        raise ValueError(
            f"views.name={views['name']} makes {small} small views per image, and method "
            f"'{method}' trains on the large ones only (methods that use small views: "
            f"{', '.join(takers)}); set views.num_small=0 or choose a view set without them"
        )


def target_settings(method: str) -> tuple[str, ...]:
    """The train.target values a method accepts ("method" alone: it has no target branch)."""
    return getattr(METHODS.get(method), "target_settings", ("method",))


def _check_target(method: str, setting: str) -> None:
    if setting not in TARGET_SETTINGS:
        raise ValueError(
            f"unknown train.target '{setting}'{suggest(setting, list(TARGET_SETTINGS))}; valid: "
            f"{', '.join(TARGET_SETTINGS)}"
        )
    valid = target_settings(method)
    if setting not in valid:
        others = [n for n in METHODS.names() if setting in target_settings(n)]
        raise ValueError(
            f"train.target={setting} changes a method's target branch, and method '{method}' has "
            f"none; valid for '{method}': {', '.join(valid)} (methods with one: "
            f"{', '.join(others)})"
        )


LOGGERS = ("jsonl", "tensorboard", "mlflow")  # train.loggers: their classes in engine/loggers.py


def check_loggers(names: str | tuple[str, ...]) -> tuple[str, ...]:
    """train.loggers as a tuple that starts with jsonl (always written), each name once. Whether
    a logger's library is installed is checked when a run starts (engine/loggers.py), so a run
    folder stays readable where it is not."""
    given = (names,) if isinstance(names, str) else tuple(names)
    for name in given:
        if name not in LOGGERS:
            raise ValueError(
                f"unknown train.loggers name '{name}'{suggest(name, list(LOGGERS))}; "
                f"known: {', '.join(LOGGERS)}"
            )
    return tuple(dict.fromkeys(("jsonl", *given)))


def _resolve_spec(section: str, registry: Registry, given: dict[str, Any]) -> dict[str, Any]:
    if "name" not in given:
        raise ValueError(
            f"config section '{section}' needs a name; valid: {', '.join(registry.names())}"
        )
    spec = dict(given)
    name = spec.pop("name")
    if not isinstance(name, str):
        raise ValueError(
            f"'{section}.name' must be a name, got {name!r}; valid: {', '.join(registry.names())}"
        )
    registry.get(name)  # unknown name -> did-you-mean error
    supplied = ENGINE_SUPPLIED.get(section, set())
    for key in supplied & set(spec):
        raise ValueError(f"'{section}.{key}' is set by the engine, not by a recipe")
    generic = SELECTION_KEYS if section == "data" else ()  # every dataset takes these
    own = [key for key in spec if key not in generic]
    try:
        registry.check_keys(name, own, where=section, hidden=supplied)
    except ValueError as error:
        if not generic:
            raise
        raise ValueError(f"{error}; every dataset also takes: {', '.join(generic)}") from None
    if generic:
        spec = check_selection(spec)
    hints = _hints(registry.get(name))
    for key, value in spec.items():
        if key in hints and _checkable(hints[key]):
            spec[key] = _coerce(f"{section}.{key}", value, hints[key])
    check_limits(section, spec)
    return {"name": name, **spec}


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:  # an annotation that does not resolve: leave those values unchecked
        return {}


_SIMPLE = {int, float, str, bool, type(None)}


def _checkable(annotation: Any) -> bool:
    """Plain scalars, sequences of one scalar type (`Sequence[float]`) and unions of those (`float
    | Sequence[float]`, `X | None`) are checked; anything else passes as given."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(_checkable(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is Sequence:
        return typing.get_args(annotation)[0] in _SIMPLE
    return annotation in _SIMPLE


# Settings with a fixed set of values, checked when the config is read (the engine's parts check
# them again against these lists for a config built in code).
CHOICES = {
    "optim.name": ("sgd", "adamw", "lars"),
    "optim.lr_scaling": ("linear", "none"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
}


def check_choice(key: str, value: str) -> None:
    """`value` is one of CHOICES[key], else a ValueError naming the close match and the list."""
    valid = CHOICES[key]
    if value not in valid:
        raise ValueError(
            f"unknown {key} '{value}'{suggest(str(value), list(valid))}; valid: {', '.join(valid)}"
        )


def _resolve_dataclass(section: str, cls: type, given: Any) -> Any:
    if isinstance(given, cls):
        return given
    if not isinstance(given, dict):
        raise ValueError(f"'{section}' expects a mapping, got {given!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in given.items():
        if key not in fields:
            listing = ", ".join(sorted(fields))
            raise ValueError(
                f"unknown key '{section}.{key}'{suggest(key, list(fields))}; valid: {listing}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    try:
        value = cls(**kwargs)
    except ValueError as error:
        raise ValueError(f"'{section}': {error}") from None
    _check_limits(section, value)
    for key in CHOICES:
        if key.startswith(f"{section}."):
            check_choice(key, getattr(value, key.partition(".")[2]))
    return value


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a simple annotation (int, float, str, bool, X | None, tuple)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(where, value, option)
            except ValueError as error:
                # a list is told about against the option that takes a list
                listed = typing.get_origin(option) in (tuple, Sequence)
                errors.append((listed != isinstance(value, (list, tuple)), str(error)))
        raise ValueError(min(errors)[1])
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"'{where}' expects a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {
            _coerce(where, k, key_type): (
                _resolve_dataclass(f"{where}.{k}", value_type, v or {})
                if dataclasses.is_dataclass(value_type)
                else _coerce(f"{where}.{k}", v, value_type)
            )
            for k, v in value.items()
        }
    if origin in (tuple, Sequence):  # a Sequence (a view set's scale) stays a list in config.yaml
        item = typing.get_args(annotation)[0]
        name = getattr(item, "__name__", str(item))
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"'{where}' expects a list of {name}, got {value!r}")
        try:
            items = [_coerce(where, v, item) for v in value]
        except ValueError:
            raise ValueError(f"'{where}' expects a list of {name}, got {value!r}") from None
        return tuple(items) if origin is tuple else type(value)(items)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"'{where}' expects true or false, got {value!r}")
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    raise ValueError(f"'{where}' expects {annotation.__name__}, got {value!r}")


def load_config(recipe: str | Path, overrides: list[str] | None = None) -> Config:
    """Recipe by name or path, plus dotted overrides, resolved and validated."""
    return resolve(apply_overrides(load_recipe(recipe), overrides or []))
