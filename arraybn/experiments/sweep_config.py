"""Sweep files: reading and validating the TOML that describes many runs (see ``sweep``).

A sweep file (every table optional)::

    root = "runs/bn-vs-nobn"          # where the runs go (relative to the current directory)
    name = "{bn}-bs{batch_size}"      # run-name template over the run's training options

    [train]                            # shared TrainConfig fields (``arraybn train`` options)
    epochs = 3
    backend = "numba"

    [grid]                             # cartesian product of lists of TrainConfig fields
    bn = ["none", "full"]
    batch_size = [32, 128]

    [[runs]]                           # and/or explicit runs: TrainConfig fields (+ name)
    name = "mean-only-augmented"
    bn = "mean-only"
    augment = true

    [postproc]                         # the run's own RUN/postproc (as ``arraybn run``)
    method = "exact"                   # method, decay, stat, batches, batch_size
    [test]                             # the run's own RUN/test: stats, batch_size, backend

    [[variants]]                       # more statistics for every trained BN model
    name = "{postproc.method}-{postproc.batches}"
    postproc = {method = ["ema", "exact"], batches = [1, 10]}   # lists expand (product)
    test = {stats = "postproc"}

Each run is ``ROOT/NAME`` with train/, postproc/ (not for ``bn = "none"``) and test/ exactly as
``arraybn run`` makes them. A variant re-uses the trained model without retraining: it is the
run directory ``ROOT/NAME/variants/VARIANT/`` whose ``train`` is a link to ``../../train``, with
its own postproc/ (when the variant has one) and test/, so ``arraybn test``/``report`` work on it.
Variants are skipped for runs without BN.

The resolved specification of a run is stored in ``RUN/sweep-run.json``. Running the sweep
again skips the stages that exist (an interrupted training resumes from its checkpoint); a run
whose specification changed is an error unless ``force``, which redoes what changed: new
training options retrain (and delete the variants, which belong to the old model), new
postproc/test/variant options redo only those stages. New variants are simply added.
"""

import dataclasses
import itertools
import os
import re
import string
import tomllib
import types

from arraybn.backends import BackendUnavailableError, get_backend
from arraybn.data import DatasetNotFoundError, find_dataset
from arraybn.errors import ConfigError
from arraybn.nn import BN_KINDS
from arraybn.stages.artifacts import StageError
from arraybn.stages.config import PostprocConfig, TestConfig, TrainConfig

TOP_KEYS = ("root", "name", "description", "train", "grid", "runs", "postproc", "test",
            "variants")
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
RUN_RECORD = "sweep-run.json"
SWEEP_LOG = "sweep.log"
VARIANTS_DIR = "variants"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")
MAX_LISTED_ERRORS = 12


class SweepConfigError(ConfigError):
    """The sweep file is unusable; the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """Extra statistics for a trained model: an optional postproc and a test."""
    name: str
    postproc: PostprocConfig
    test: TestConfig

    def record(self):
        return {"postproc": None if self.postproc is None else dataclasses.asdict(self.postproc),
                "test": dataclasses.asdict(self.test)}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: where it goes and everything its stages are given."""
    name: str
    run_dir: str
    config: TrainConfig
    postproc: PostprocConfig
    test: TestConfig
    variants: tuple

    @property
    def has_bn(self):
        """Batch statistics to post-process: a BN kind (not 'none' or 'group')."""
        return self.config.bn in BN_KINDS

    def record(self):
        """The JSON-able specification stored in ``RUN/sweep-run.json``."""
        return {"train": self.config.to_dict(),
                "postproc": dataclasses.asdict(self.postproc) if self.has_bn else None,
                "test": dataclasses.asdict(self.test),
                "variants": {v.name: v.record() for v in self.variants} if self.has_bn else {}}

    def variant_dir(self, variant):
        return os.path.join(self.run_dir, VARIANTS_DIR, variant.name)


@dataclasses.dataclass
class Sweep:
    path: str
    root: str
    runs: list


# --- reading and validating a sweep file --------------------------------------------------------


def _unknown(keys, allowed, where):
    unknown = sorted(set(keys) - set(allowed))
    if not unknown:
        return []
    return [f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(allowed: {', '.join(allowed)})"]


def _table(data, key, kind, errors):
    value = data.get(key, kind())
    if not isinstance(value, kind):
        errors.append(f"{key} must be a {'table' if kind is dict else 'list of tables'}, "
                      f"got {type(value).__name__}")
        return kind()
    return value


def _format_name(template, values, where, errors):
    """``template`` filled from ``values``; a problem is appended to ``errors`` (returns None)."""
    try:
        name = string.Formatter().vformat(template, (), values)
    except (KeyError, AttributeError, IndexError, ValueError) as exc:
        errors.append(f"{where}: name template {template!r} cannot be filled ({exc!r}); use "
                      f"fields like {{bn}}, {{batch_size}}")
        return None
    if not NAME_PATTERN.match(name):
        errors.append(f"{where}: run name {name!r} must start with a letter or digit and hold "
                      "only letters, digits and . _ + = , -")
        return None
    return name


def _name_values(config):
    values = config.to_dict()
    values["hidden"] = "-".join(map(str, config.hidden))
    return {k: ("none" if v is None else v) for k, v in values.items()}


def _grid_points(grid, errors):
    """Dicts of the cartesian product of ``grid``'s lists (one empty dict without a grid).

    A key that is not a training option may list tables of options that vary together, e.g.
    ``regularise = [{augment = false, dropout = 0.0}, {augment = true, dropout = 0.3}]``.
    """
    axes, problems = [], []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(f"[grid] {key} must be a non-empty list, got {values!r}")
        elif key in TRAIN_FIELDS:
            axes.append([{key: value} for value in values])
        elif all(isinstance(value, dict) for value in values):
            for value in values:
                errors.extend(_unknown(value, TRAIN_FIELDS, f"[grid] {key}"))
            axes.append(values)
        else:
            problems.append(f"[grid] {key} is not a training option (allowed: "
                            f"{', '.join(TRAIN_FIELDS)}); a key of your own must list tables "
                            "of options that vary together")
    errors.extend(problems)
    if problems:
        return []
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def _default_template(grid):
    keys = [key for key, values in grid.items() if key in TRAIN_FIELDS] + \
        sorted({k for key, values in grid.items() if key not in TRAIN_FIELDS
                and isinstance(values, list) for v in values if isinstance(v, dict) for k in v})
    return "-".join(f"{key}{{{key}}}" for key in keys) if keys else "run"


def _type_problems(values, where):
    """{key: message} for the values whose TOML type does not fit the TrainConfig field
    (checked against its default)."""
    defaults = TrainConfig()
    problems = {}
    for key, value in values.items():
        default = getattr(defaults, key)
        expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,),
                    tuple: (list,)}.get(type(default))
        if expected is None or value is None:
            continue
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            problems[key] = f"{where}: {key} must be {_type_word(type(default))}, got {value!r}"
    return problems


def _type_word(kind):
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "a list of integers"}[kind]


def _make_config(values, where, errors):
    """The run's TrainConfig, or None after appending every problem of ``values`` to
    ``errors`` (the well-typed values are checked beside the badly typed ones)."""
    badly_typed = _type_problems(values, where)
    problems = list(badly_typed.values())
    well_typed = {k: v for k, v in values.items() if k not in badly_typed}
    try:
        config = TrainConfig(**well_typed)
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}: {exc}")
    errors.extend(problems)
    return None if problems else config


def _spec(cls, values, where, errors, allowed=None):
    """``cls(**values)`` validated; problems go to ``errors``."""
    fields = allowed or tuple(f.name for f in dataclasses.fields(cls))
    if not isinstance(values, dict):
        errors.append(f"{where} must be a table, got {values!r}")
        return None
    problems = _unknown(values, fields, where)
    if problems:
        errors.extend(problems)
        return None
    if values.get("batches") == "all":  # TOML has no null: "all" means every batch
        values = {**values, "batches": None}
    try:
        return cls(**values)
    except (TypeError, ValueError, StageError) as exc:
        errors.append(f"{where}: {exc}")
        return None


def _expand(table):
    """Product over the list-valued entries of ``table`` (a dict); scalars are kept."""
    keys = [k for k, v in table.items() if isinstance(v, list)]
    for combo in itertools.product(*(table[k] for k in keys)):
        yield {**table, **dict(zip(keys, combo))}


def _variants(entries, errors):
    """The expanded, validated variants of the ``[[variants]]`` tables."""
    variants = []
    for i, entry in enumerate(entries):
        where = f"[[variants]] #{i + 1}"
        if not isinstance(entry, dict):
            errors.append(f"{where} must be a table")
            continue
        errors.extend(_unknown(entry, ("name", "postproc", "test"), where))
        if "name" not in entry:
            errors.append(f"{where} needs a name (a template such as "
                          "\"{postproc.method}-{postproc.batches}\")")
            continue
        post_table, test_table = entry.get("postproc"), entry.get("test", {})
        if not isinstance(test_table, dict) or not isinstance(post_table or {}, dict):
            errors.append(f"{where}: postproc and test must be tables")
            continue
        for post_values in (_expand(post_table) if post_table is not None else [None]):
            for test_values in _expand(test_table):
                variant = _variant(entry["name"], post_values, test_values, where, errors)
                if variant is not None:
                    variants.append(variant)
    return variants


def _variant(template, post_values, test_values, where, errors):
    post = None
    if post_values is not None:
        post = _spec(PostprocConfig, post_values, f"{where} postproc", errors)
        if post is None:
            return None
    test = _spec(TestConfig, test_values, f"{where} test", errors)
    if test is None:
        return None
    if post is not None and test.stats not in (None, "postproc"):
        errors.append(f"{where}: a variant with a postproc is tested with its statistics; "
                      f"drop postproc to test with stats={test.stats!r}")
        return None
    if post is None and test.stats in (None, "postproc"):
        errors.append(f"{where}: without a postproc table a variant needs test stats "
                      "'running' or 'batch'")
        return None
    if post is not None:
        test = dataclasses.replace(test, stats="postproc")
    post_names = dataclasses.asdict(post) if post else {}
    if post_names.get("batches", 0) is None:
        post_names["batches"] = "all"
    fields = {"postproc": types.SimpleNamespace(**post_names),
              "test": types.SimpleNamespace(**dataclasses.asdict(test))}
    name = _format_name(template, fields, where, errors)
    return None if name is None else Variant(name, post, test)


def _run_points(data, errors):
    """``[(explicit name or None, training values)]`` from [grid] and [[runs]]."""
    shared = _table(data, "train", dict, errors)
    errors.extend(_unknown(shared, TRAIN_FIELDS, "[train]"))
    grid = _table(data, "grid", dict, errors)
    explicit = _table(data, "runs", list, errors)
    points = [(None, {**shared, **point}) for point in _grid_points(grid, errors)] \
        if grid or not explicit else []
    for i, entry in enumerate(explicit):
        if not isinstance(entry, dict):
            errors.append(f"[[runs]] #{i + 1} must be a table")
            continue
        errors.extend(_unknown(entry, TRAIN_FIELDS + ("name",), f"[[runs]] #{i + 1}"))
        values = {k: v for k, v in entry.items() if k != "name"}
        points.append((entry.get("name"), {**shared, **values}))
    return points


def parse_sweep(data, root):
    """A validated ``(root, [RunSpec])`` from the parsed TOML ``data``; raises SweepConfigError."""
    errors = _unknown(data, TOP_KEYS, "top level")
    post = _spec(PostprocConfig, _table(data, "postproc", dict, errors), "[postproc]", errors)
    test = _spec(TestConfig, _table(data, "test", dict, errors), "[test]", errors)
    variants = _variants(_table(data, "variants", list, errors), errors)
    template = data.get("name", _default_template(data.get("grid", {})))
    runs = []
    for i, (name, values) in enumerate(_run_points(data, errors)):
        where = f"run #{i + 1} ({name or ', '.join(f'{k}={v!r}' for k, v in values.items())})"
        known = {k: v for k, v in values.items() if k in TRAIN_FIELDS}  # unknown: named above
        config = _make_config(known, where, errors)
        if config is None:
            continue
        run_name = _format_name(name or template, _name_values(config), where, errors)
        if run_name is not None and post is not None and test is not None:
            runs.append(RunSpec(run_name, os.path.join(root, run_name), config, post, test,
                                tuple(variants)))
    _check_unique([r.name for r in runs], "run", errors)
    _check_unique([v.name for v in variants], "variant", errors)
    _check_resources(runs, errors)
    if errors:
        raise SweepConfigError(_error_text(errors))
    return runs


def _check_unique(names, what, errors):
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        errors.append(f"{what} names repeat: {', '.join(repeated)}; give each {what} a distinct "
                      "name (use more fields in the name template)")


def _check_resources(runs, errors):
    """Every dataset and backend the runs need is there (checked once each)."""
    for dataset, data_dir in sorted({(r.config.dataset, r.config.data_dir or "") for r in runs}):
        try:
            find_dataset(dataset, data_dir or None)
        except DatasetNotFoundError as exc:
            errors.append(str(exc))
    backends = {r.config.backend for r in runs} | {v.test.backend for r in runs
                                                   for v in r.variants} | {None}
    for name in sorted(backends - {None}):
        try:
            get_backend(name)
        except (BackendUnavailableError, ValueError) as exc:
            errors.append(f"backend {name!r}: {exc}")


def _error_text(errors):
    shown = errors[:MAX_LISTED_ERRORS]
    more = len(errors) - len(shown)
    lines = [f"  - {e}" for e in shown] + ([f"  ... and {more} more"] if more else [])
    return "the sweep file has problems; nothing was run:\n" + "\n".join(lines)


def load_sweep(path, root=None):
    """Read and validate the sweep file ``path``; ``root`` overrides its ``root``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SweepConfigError(f"cannot read the sweep file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepConfigError(f"{path} is not valid TOML: {exc}") from None
    if root is None:
        root = data.get("root", os.path.join("runs", os.path.splitext(os.path.basename(path))[0]))
    root = os.fspath(root) if isinstance(root, os.PathLike) else root
    if not isinstance(root, str) or not root:
        raise SweepConfigError(f"{path}: root must be a directory name, got {root!r}")
    try:
        runs = parse_sweep(data, os.fspath(root))
    except SweepConfigError as exc:
        raise SweepConfigError(f"{path}: {exc}") from None
    return Sweep(path, os.fspath(root), runs)
