"""A hospital's tabular dataset: the schema that describes it, the loader and the train/test split.

A site keeps its data as one local CSV (``.csv``, UTF-8, header row) or Parquet (``.parquet``) file
and describes it with a schema YAML file::

    features:
      - {name: age, type: numeric, min: 0, max: 120}     # min/max: plausibility range, optional
      - {name: cp, type: categorical, levels: [typical angina, atypical angina]}
      - {name: fbs, type: boolean, true_values: ["TRUE"], false_values: ["FALSE"]}
    target:
      column: num
      classes:                          # class index = position in this list
        - {name: no disease, values: [0]}
        - {name: disease, values: [1, 2, 3, 4]}
    missing: drop-row                   # or: error
    missing_values: [""]                # optional; default "", NA, NaN and ?
    ignore: [id]                        # optional; columns present in the file but not used

Every YAML scalar is read as text (no YAML 1.1 surprises: ``TRUE``, ``no`` and ``0`` stay the
strings they look like); duplicate keys and unknown keys are errors. Raw values are compared after
stripping surrounding spaces, and an integral number written with a fractional part (``1.0``,
as Parquet float columns hold it) matches the level or target value written without (``1``).

Loading turns the file into a :class:`SiteTable`: one float32 row per patient record, unscaled
(numeric values as recorded, booleans as 0/1, each categorical level one-hot in schema order) and an
int64 class index. Scaling is left to training, which must compute it from federated statistics,
never from one site's raw values in another's process.

Every problem with a file or a schema raises :class:`~clinfed.errors.SiteDataError` with a one-line
message naming the file and the column or key. Messages and log lines may give a row's position
but never a patient-level value.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeAlias, cast, get_args

import numpy as np
import numpy.typing as npt
import yaml

from clinfed.errors import ConfigError, SiteDataError

__all__ = [
    "DatasetSchema",
    "Feature",
    "SiteTable",
    "load_schema",
    "load_site_table",
    "split_train_test",
]

logger = logging.getLogger(__name__)

_FeatureKind: TypeAlias = Literal["numeric", "categorical", "boolean"]
_MissingPolicy: TypeAlias = Literal["drop-row", "error"]
# One cell as read from a file: CSV gives text; Parquet gives typed values, None for null.
_Cell: TypeAlias = str | bool | int | float | None

_FEATURE_KINDS: tuple[str, ...] = get_args(_FeatureKind)
_MISSING_POLICIES: tuple[str, ...] = get_args(_MissingPolicy)
_DEFAULT_MISSING_VALUES = ("", "NA", "NaN", "?")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INTEGRAL_TEXT = re.compile(r"(-?[0-9]+)\.0*")
_MAX_YAML_DEPTH = 16


def _canonical(value: str | int | float) -> str:
    """The text a raw value is compared as: stripped, ``1.0`` and ``1`` alike, ``007`` kept."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = value.strip()
    match = _INTEGRAL_TEXT.fullmatch(text)
    return match.group(1) if match else text


def _canonical_tuple(values: Iterable[str], *, what: str) -> tuple[str, ...]:
    result = tuple(_canonical(v) for v in values)
    repeated = sorted(v for v, count in Counter(result).items() if count > 1)
    if repeated:
        raise SiteDataError(
            f"{what} must not repeat a value; found {', '.join(map(repr, repeated))} more than"
            " once (after stripping spaces and '.0'); list each value once"
        )
    return result


@dataclass(frozen=True, kw_only=True)
class Feature:
    """One input column of a site dataset.

    ``numeric`` columns hold numbers, optionally within the plausibility range
    [``minimum``, ``maximum``] (a value outside it is an error, not a clip). ``categorical`` columns
    hold one of ``levels`` and are one-hot encoded, one column per level in this order.
    ``boolean`` columns hold one of ``true_values`` or ``false_values`` and encode as 1.0 / 0.0.
    """

    name: str
    kind: _FeatureKind
    levels: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    true_values: tuple[str, ...] = ()
    false_values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SiteDataError(
                f"a feature name must be a non-empty string; found {self.name!r}; name the column"
            )
        where = f"feature {self.name!r}"
        if self.kind not in _FEATURE_KINDS:
            raise SiteDataError(
                f"{where}: type must be one of {', '.join(_FEATURE_KINDS)}; found {self.kind!r};"
                " fix the spelling"
            )
        object.__setattr__(self, "levels", _canonical_tuple(self.levels, what=f"{where}: levels"))
        object.__setattr__(
            self, "true_values", _canonical_tuple(self.true_values, what=f"{where}: true_values")
        )
        object.__setattr__(
            self,
            "false_values",
            _canonical_tuple(self.false_values, what=f"{where}: false_values"),
        )
        has_range = self.minimum is not None or self.maximum is not None
        has_spellings = bool(self.true_values or self.false_values)
        if self.kind == "categorical" and not self.levels:
            raise SiteDataError(
                f"{where}: a categorical feature needs its levels; found none; list every value"
                " the column may hold under `levels`"
            )
        if self.kind != "categorical" and self.levels:
            raise SiteDataError(
                f"{where}: only categorical features take `levels`; this one is {self.kind};"
                " remove `levels` or set `type: categorical`"
            )
        if self.kind != "numeric" and has_range:
            raise SiteDataError(
                f"{where}: only numeric features take `min`/`max`; this one is {self.kind};"
                " remove them or set `type: numeric`"
            )
        if self.kind == "boolean":
            if not self.true_values or not self.false_values:
                raise SiteDataError(
                    f"{where}: a boolean feature needs both `true_values` and `false_values`;"
                    " list how the file spells each, e.g. true_values: ['TRUE']"
                )
            both = sorted(set(self.true_values) & set(self.false_values))
            if both:
                raise SiteDataError(
                    f"{where}: {', '.join(map(repr, both))} is in both `true_values` and"
                    " `false_values`; keep each spelling on one side"
                )
        elif has_spellings:
            raise SiteDataError(
                f"{where}: only boolean features take `true_values`/`false_values`; this one is"
                f" {self.kind}; remove them or set `type: boolean`"
            )
        for key, bound in (("min", self.minimum), ("max", self.maximum)):
            if bound is not None and (isinstance(bound, bool) or not math.isfinite(bound)):
                raise SiteDataError(
                    f"{where}: `{key}` must be a finite number; found {bound!r}; write a number"
                    " or leave it out"
                )
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise SiteDataError(
                f"{where}: `min` must not exceed `max`; found min {self.minimum} > max"
                f" {self.maximum}; swap or correct them"
            )

    @property
    def encoded_names(self) -> tuple[str, ...]:
        """Names of the encoded columns: the name itself, or ``name=level`` per level."""
        if self.kind == "categorical":
            return tuple(f"{self.name}={level}" for level in self.levels)
        return (self.name,)


@dataclass(frozen=True, kw_only=True)
class DatasetSchema:
    """What a site's data file holds and how it becomes model inputs and class indices.

    ``target_map`` maps each raw target value (as text, see the module docstring) to a class
    index into ``class_names``; every class must be reachable. ``missing`` says what to do with a
    row that has a missing value in a used column: ``drop-row`` drops it (counted and logged),
    ``error`` refuses the file. A missing target is always an error. Columns in ``ignore`` may be
    present in the file and are skipped; any other extra column is skipped and logged.
    """

    features: tuple[Feature, ...]
    target: str
    class_names: tuple[str, ...]
    target_map: Mapping[str, int] = field(hash=False)
    missing: _MissingPolicy = "drop-row"
    ignore: tuple[str, ...] = ()
    missing_values: tuple[str, ...] = _DEFAULT_MISSING_VALUES

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "missing_values", tuple(v.strip() for v in self.missing_values))
        if not self.features:
            raise SiteDataError(
                "features must list at least one column; found none; describe the input columns"
            )
        names = [f.name for f in self.features]
        _refuse_repeats(names, what="features")
        if not isinstance(self.target, str) or not self.target.strip():
            raise SiteDataError(
                f"target.column must name the label column; found {self.target!r}; set it"
            )
        if self.target in names:
            raise SiteDataError(
                f"target.column {self.target!r} is also listed under features; a column cannot"
                " be both input and label; remove it from features"
            )
        used_and_ignored = sorted(set(self.ignore) & {*names, self.target})
        if used_and_ignored:
            raise SiteDataError(
                f"ignore lists {', '.join(map(repr, used_and_ignored))}, which the schema also"
                " uses; remove it from ignore or from features/target"
            )
        if self.missing not in _MISSING_POLICIES:
            raise SiteDataError(
                f"missing must be one of {', '.join(_MISSING_POLICIES)}; found {self.missing!r};"
                " fix the spelling"
            )
        if len(self.class_names) < 2:
            raise SiteDataError(
                f"target.classes must list at least 2 classes; found {len(self.class_names)};"
                " a classifier needs two outcomes or more"
            )
        _refuse_repeats(self.class_names, what="target.classes names")
        target_map: dict[str, int] = {}
        for raw, index in self.target_map.items():
            key = _canonical(raw)
            if key in target_map:
                raise SiteDataError(
                    f"target.classes: raw value {key!r} is listed twice; give each raw value"
                    " one class"
                )
            if isinstance(index, bool) or not 0 <= index < len(self.class_names):
                raise SiteDataError(
                    f"target.classes: raw value {key!r} maps to class {index!r}, not an index"
                    f" in 0..{len(self.class_names) - 1}; map it to an existing class"
                )
            target_map[key] = index
        unreachable = [
            self.class_names[i]
            for i in range(len(self.class_names))
            if i not in target_map.values()
        ]
        if unreachable:
            raise SiteDataError(
                f"target.classes: class {', '.join(map(repr, unreachable))} has no raw value;"
                " list the raw target values under its `values`"
            )
        object.__setattr__(self, "target_map", MappingProxyType(target_map))
        spellings = set(self.missing_values)
        for feature in self.features:
            clash = spellings & {*feature.levels, *feature.true_values, *feature.false_values}
            if clash:
                raise SiteDataError(
                    f"feature {feature.name!r}: {', '.join(map(repr, sorted(clash)))} is both a"
                    " value of the feature and a missing_values spelling; remove one of them"
                )
        clash = spellings & set(target_map)
        if clash:
            raise SiteDataError(
                f"target.classes: {', '.join(map(repr, sorted(clash)))} is both a target value"
                " and a missing_values spelling; remove one of them"
            )

    @property
    def encoded_feature_names(self) -> tuple[str, ...]:
        """Names of the model input columns, in order (see :class:`Feature`)."""
        return tuple(name for feature in self.features for name in feature.encoded_names)

    @property
    def num_encoded_features(self) -> int:
        """Width of :attr:`SiteTable.features`."""
        return len(self.encoded_feature_names)

    @property
    def num_classes(self) -> int:
        """Number of classes; labels are in ``range(num_classes)``."""
        return len(self.class_names)


def _refuse_repeats(values: Sequence[str], *, what: str) -> None:
    repeated = sorted(v for v, count in Counter(values).items() if count > 1)
    if repeated:
        raise SiteDataError(
            f"{what} must be unique; found {', '.join(map(repr, repeated))} more than once;"
            " keep one of each"
        )


# --- schema YAML -----------------------------------------------------------------------------

# Parsed YAML where every scalar is text: str, list of such, or dict of such.
_Yaml: TypeAlias = str | list["_Yaml"] | dict[str, "_Yaml"]

_SCHEMA_KEYS = frozenset(
    {"features", "target", "missing", "missing_values", "ignore", "description"}
)
_FEATURE_KEYS = frozenset(
    {"name", "type", "levels", "min", "max", "true_values", "false_values", "description"}
)
_TARGET_KEYS = frozenset({"column", "classes"})
_CLASS_KEYS = frozenset({"name", "values"})


class _SchemaKeyError(Exception):
    """A schema YAML key holds the wrong thing; ``str()`` is the message after the file name."""


def _yaml_to_text(node: yaml.Node, depth: int = 0) -> _Yaml:
    # compose() with BaseLoader leaves every scalar as its text, so TRUE/no/0 stay strings.
    if depth > _MAX_YAML_DEPTH:
        raise _SchemaKeyError(f"line {node.start_mark.line + 1}: nesting is too deep")
    if isinstance(node, yaml.ScalarNode):
        return cast(str, node.value)
    if isinstance(node, yaml.SequenceNode):
        return [_yaml_to_text(item, depth + 1) for item in node.value]
    if isinstance(node, yaml.MappingNode):
        result: dict[str, _Yaml] = {}
        for key_node, value_node in node.value:
            key = _yaml_to_text(key_node, depth + 1)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise _SchemaKeyError(f"line {line}: a key must be plain text")
            if key in result:
                raise _SchemaKeyError(f"line {line}: key {key!r} appears twice; keep one")
            result[key] = _yaml_to_text(value_node, depth + 1)
        return result
    raise _SchemaKeyError(f"line {node.start_mark.line + 1}: unsupported YAML node")


def _mapping(value: _Yaml | None, *, key: str, allowed: frozenset[str]) -> dict[str, _Yaml]:
    if not isinstance(value, dict):
        raise _SchemaKeyError(f"{key} must be a mapping of keys to values; found {_kind(value)}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _SchemaKeyError(
            f"{key} has unknown key {', '.join(map(repr, unknown))}; allowed keys are"
            f" {', '.join(sorted(allowed))}"
        )
    return value


def _text(value: _Yaml | None, *, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _SchemaKeyError(f"{key} must be a non-empty text value; found {_kind(value)}")
    return value.strip()


def _text_list(value: _Yaml | None, *, key: str, allow_empty_items: bool = False) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _SchemaKeyError(f"{key} must be a list, e.g. [a, b]; found {_kind(value)}")
    items: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or (not allow_empty_items and not item.strip()):
            raise _SchemaKeyError(f"{key}[{i}] must be a non-empty text value")
        items.append(item)
    return items


def _number(value: _Yaml | None, *, key: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, str) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise _SchemaKeyError(f"{key} must be a finite number; found {value!r}")
    return number


def _kind(value: _Yaml | None) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"the text {value!r}"


def _parse_feature(value: _Yaml, *, key: str) -> Feature:
    entry = _mapping(value, key=key, allowed=_FEATURE_KEYS)
    name = _text(entry.get("name"), key=f"{key}.name")
    kind = _text(entry.get("type"), key=f"{key}.type")
    if kind not in _FEATURE_KINDS:
        raise _SchemaKeyError(
            f"{key}.type must be one of {', '.join(_FEATURE_KINDS)}; found {kind!r}"
        )
    return Feature(
        name=name,
        kind=cast(_FeatureKind, kind),
        levels=tuple(_text_list(entry.get("levels"), key=f"{key}.levels")),
        minimum=_number(entry.get("min"), key=f"{key}.min"),
        maximum=_number(entry.get("max"), key=f"{key}.max"),
        true_values=tuple(_text_list(entry.get("true_values"), key=f"{key}.true_values")),
        false_values=tuple(_text_list(entry.get("false_values"), key=f"{key}.false_values")),
    )


def _parse_schema(document: _Yaml | None) -> DatasetSchema:
    top = _mapping(document, key="the schema", allowed=_SCHEMA_KEYS)
    for required in ("features", "target"):
        if required not in top:
            raise _SchemaKeyError(f"`{required}` is required but missing")
    raw_features = top["features"]
    if not isinstance(raw_features, list) or not raw_features:
        raise _SchemaKeyError(f"features must be a non-empty list; found {_kind(raw_features)}")
    features = tuple(
        _parse_feature(item, key=f"features[{i}]") for i, item in enumerate(raw_features)
    )
    target = _mapping(top["target"], key="target", allowed=_TARGET_KEYS)
    column = _text(target.get("column"), key="target.column")
    raw_classes = target.get("classes")
    if not isinstance(raw_classes, list) or not raw_classes:
        raise _SchemaKeyError(
            f"target.classes must be a list of {{name, values}}; found {_kind(raw_classes)}"
        )
    class_names: list[str] = []
    target_map: dict[str, int] = {}
    for index, item in enumerate(raw_classes):
        key = f"target.classes[{index}]"
        entry = _mapping(item, key=key, allowed=_CLASS_KEYS)
        class_names.append(_text(entry.get("name"), key=f"{key}.name"))
        values = _text_list(entry.get("values"), key=f"{key}.values")
        if not values:
            raise _SchemaKeyError(f"{key}.values must list the raw target values of the class")
        for raw in values:
            if _canonical(raw) in target_map:
                raise _SchemaKeyError(f"{key}.values: raw value {raw!r} is in two classes")
            target_map[_canonical(raw)] = index
    missing = top.get("missing", "drop-row")
    if missing not in _MISSING_POLICIES:
        raise _SchemaKeyError(
            f"missing must be one of {', '.join(_MISSING_POLICIES)}; found {_kind(missing)}"
        )
    missing_values = (
        _text_list(top["missing_values"], key="missing_values", allow_empty_items=True)
        if "missing_values" in top
        else list(_DEFAULT_MISSING_VALUES)
    )
    return DatasetSchema(
        features=features,
        target=column,
        class_names=tuple(class_names),
        target_map=target_map,
        missing=cast(_MissingPolicy, missing),
        ignore=tuple(_text_list(top.get("ignore"), key="ignore")),
        missing_values=tuple(missing_values),
    )


def load_schema(path: str | Path) -> DatasetSchema:
    """Read a schema YAML file (format in the module docstring).

    Raises:
        SiteDataError: the file is missing or unreadable, is not YAML, or a key is missing,
            unknown or holds the wrong thing; the message names the file and the key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SiteDataError(
            f"schema file {str(path)!r} does not exist; check the schema path in the site config"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise SiteDataError(
            f"cannot read schema file {str(path)!r} ({reason}); make it a readable UTF-8 file"
        ) from None
    try:
        node = yaml.compose(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise SiteDataError(
            f"{path.name!r} is not valid YAML{where}: {problem}; fix the YAML syntax"
        ) from None
    try:
        return _parse_schema(None if node is None else _yaml_to_text(node))
    except _SchemaKeyError as error:
        raise SiteDataError(
            f"{path.name!r}: {error}; see the schema format in clinfed.client.data"
        ) from None
    except SiteDataError as error:
        raise SiteDataError(f"{path.name!r}: {error}") from None


# --- site table ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class SiteTable:
    """A site's labelled records, encoded for a model.

    ``features`` is float32 of shape ``[len(self), schema.num_encoded_features]`` in the order of
    ``schema.encoded_feature_names``, unscaled. ``labels`` is int64 of shape ``[len(self)]`` with
    class indices into ``schema.class_names``. ``source`` is the data file's name (no directory),
    ``rows_dropped`` how many rows of that file the missing-value policy dropped. Each table owns
    its arrays (:func:`split_train_test` copies), so wrapping them in ``torch.from_numpy`` is safe.
    """

    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    schema: DatasetSchema
    source: str
    rows_dropped: int = 0

    def __post_init__(self) -> None:
        if self.features.dtype != np.float32 or self.labels.dtype != np.int64:
            raise TypeError(
                f"SiteTable needs float32 features and int64 labels; got {self.features.dtype}"
                f" and {self.labels.dtype}"
            )
        width = self.schema.num_encoded_features
        if (
            self.features.ndim != 2
            or self.features.shape[1] != width
            or self.labels.shape != (self.features.shape[0],)
        ):
            raise ValueError(
                f"SiteTable needs features of shape [n, {width}] and labels of shape [n]; got"
                f" {self.features.shape} and {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class _Columns:
    """The used columns of a file, cell by cell, and where each data row is in the file."""

    cells: dict[str, list[_Cell]]
    locations: list[str]
    extra: list[str]


def load_site_table(path: str | Path, schema: DatasetSchema) -> SiteTable:
    """Load a site's CSV or Parquet file (chosen by suffix) as described by ``schema``.

    Rows with a missing value in a feature column are dropped (``missing: drop-row``, counted in
    ``rows_dropped`` and logged) or refused (``missing: error``).

    Raises:
        SiteDataError: the file is missing, unreadable, empty, not CSV or Parquet, has duplicate
            or missing columns, a cell of the wrong type, outside its plausibility range, an
            unknown level or boolean spelling, a missing or unknown target, or no row is left.
            The one-line message names the file, the column and the row, never the value.
    """
    path = Path(path)
    source = path.name
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise SiteDataError(
            f"{source!r}: a site data file must end in .csv or .parquet; found"
            f" {suffix or 'no suffix'!r}; export the data as UTF-8 CSV or Parquet"
        )
    if not path.is_file():
        raise SiteDataError(
            f"site data file {str(path)!r} does not exist or is not a file; check the data path"
            " in the site config"
        )
    columns = _read_csv(path, schema) if suffix == ".csv" else _read_parquet(path, schema)
    if columns.extra:
        logger.info(
            "%s: ignoring columns the schema does not name: %s (list them under `ignore` to"
            " silence this)",
            source,
            ", ".join(repr(name) for name in columns.extra),
        )
    return _encode(columns, schema=schema, source=source)


def _check_header(header: Sequence[str], *, source: str, schema: DatasetSchema) -> list[str]:
    """Refuse missing or duplicate columns; return the extra ones (not used, not ignored)."""
    used = [f.name for f in schema.features] + [schema.target]
    absent = [name for name in used if name not in header]
    if absent:
        # The header is not echoed: in a file without one, it would be a patient's row.
        raise SiteDataError(
            f"{source!r}: column {', '.join(map(repr, absent))} required by the schema is not in"
            " the file's header; check the first row of the file or rename the column"
        )
    repeated = sorted(name for name, count in Counter(header).items() if count > 1 and name)
    if repeated:
        raise SiteDataError(
            f"{source!r}: column {', '.join(map(repr, repeated))} appears more than once in the"
            " header; rename or remove the duplicate"
        )
    known = {*used, *schema.ignore}
    return [name or "<unnamed>" for name in header if name not in known]


def _read_csv(path: Path, schema: DatasetSchema) -> _Columns:
    source = path.name
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SiteDataError(
            f"{source!r} is not UTF-8 text (undecodable byte at offset {error.start}); export"
            " it again as UTF-8 CSV"
        ) from None
    except OSError as error:
        raise SiteDataError(
            f"cannot read {source!r} ({error.strerror}); check the file's permissions"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[str] = []
    try:
        for row in reader:
            if not row:
                continue
            if header is None:
                header = [name.strip() for name in row]
                continue
            if len(row) != len(header):
                raise SiteDataError(
                    f"{source!r}: line {reader.line_num} has {len(row)} fields but the header"
                    f" has {len(header)}; give every line one value per column (quote values"
                    " that contain commas)"
                )
            rows.append(row)
            lines.append(f"line {reader.line_num}")
    except csv.Error as error:
        raise SiteDataError(
            f"{source!r}: line {reader.line_num} is not valid CSV ({error}); fix or re-export"
            " the file"
        ) from None
    if header is None:
        raise SiteDataError(
            f"{source!r} is empty; a site file needs a header row naming the columns and at"
            " least one data row"
        )
    if not rows:
        raise SiteDataError(
            f"{source!r} has a header but no data rows; export the records into the file"
        )
    extra = _check_header(header, source=source, schema=schema)
    position = {name: i for i, name in enumerate(header)}
    used = [f.name for f in schema.features] + [schema.target]
    cells: dict[str, list[_Cell]] = {name: [row[position[name]] for row in rows] for name in used}
    return _Columns(cells=cells, locations=lines, extra=extra)


def _read_parquet(path: Path, schema: DatasetSchema) -> _Columns:
    source = path.name
    # Imported here: pyarrow takes a noticeable time to import and CSV sites never need it.
    try:
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError:
        raise SiteDataError(
            f"{source!r}: reading Parquet needs the pyarrow package; install it or convert the"
            " file to CSV"
        ) from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise SiteDataError(
            f"{source!r} is not a readable Parquet file ({type(error).__name__}); export it"
            " again as Parquet or as UTF-8 CSV"
        ) from None
    header = [str(name) for name in table.column_names]
    if table.num_columns == 0 or table.num_rows == 0:
        raise SiteDataError(
            f"{source!r} has no {'columns' if table.num_columns == 0 else 'rows'}; a site file"
            " needs named columns and at least one record"
        )
    extra = _check_header(header, source=source, schema=schema)
    cells: dict[str, list[_Cell]] = {}
    for name in [f.name for f in schema.features] + [schema.target]:
        column = table.column(header.index(name))
        arrow_type = column.type
        if pa.types.is_dictionary(arrow_type):
            arrow_type = arrow_type.value_type
        if not (
            pa.types.is_string(arrow_type)
            or pa.types.is_large_string(arrow_type)
            or pa.types.is_boolean(arrow_type)
            or pa.types.is_integer(arrow_type)
            or pa.types.is_floating(arrow_type)
            or pa.types.is_decimal(arrow_type)
            or pa.types.is_null(arrow_type)
        ):
            raise SiteDataError(
                f"{source!r}: column {name!r} has Parquet type {arrow_type}, which clinfed does"
                " not read; store it as numbers, text or booleans"
            )
        try:
            values = column.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException):
            # Parquet readers do not validate UTF-8; Python's decoding of a cell does.
            raise SiteDataError(
                f"{source!r}: column {name!r} holds text that is not valid UTF-8; export the file"
                " again"
            ) from None
        cells[name] = [float(value) if isinstance(value, Decimal) else value for value in values]
    locations = [f"row {i + 1}" for i in range(table.num_rows)]
    return _Columns(cells=cells, locations=locations, extra=extra)


def _is_missing(cell: _Cell, spellings: frozenset[str]) -> bool:
    if cell is None:
        return True
    if isinstance(cell, float):
        return math.isnan(cell)
    if isinstance(cell, str):
        return cell.strip() in spellings
    return False


def _some(values: Sequence[str], limit: int = 8) -> str:
    """Schema values for a message, cut short so that the message stays one readable line."""
    shown = ", ".join(map(repr, values[:limit]))
    return shown + (f", … ({len(values) - limit} more)" if len(values) > limit else "")


def _decode_numeric(feature: Feature) -> Callable[[_Cell], tuple[float, ...] | str]:
    """A decoder returning the encoded values, or the problem (without the value) as text."""
    not_a_number = (
        "is not a number; numeric columns hold numbers — fix the cell or declare the column"
        " categorical in the schema"
    )
    low = -math.inf if feature.minimum is None else feature.minimum
    high = math.inf if feature.maximum is None else feature.maximum

    def decode(cell: _Cell) -> tuple[float, ...] | str:
        if isinstance(cell, bool) or cell is None:
            return not_a_number
        try:
            value = float(cell)
        except (ValueError, OverflowError):
            return not_a_number
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            return "is not a finite float32 number; fix the cell"
        if not low <= value <= high:
            return (
                f"is outside the plausible range [{low:g}, {high:g}] given in"
                " the schema; fix the cell, or widen min/max if the range is wrong"
            )
        return (value,)

    return decode


def _decode_categorical(feature: Feature) -> Callable[[_Cell], tuple[float, ...] | str]:
    one_hot = {
        level: tuple(1.0 if j == i else 0.0 for j in range(len(feature.levels)))
        for i, level in enumerate(feature.levels)
    }
    problem = (
        f"holds a level not in the schema's levels ({_some(feature.levels)}); fix the cell or"
        " add the level to the schema"
    )

    def decode(cell: _Cell) -> tuple[float, ...] | str:
        return one_hot.get(_canonical(cell), problem) if cell is not None else problem

    return decode


def _decode_boolean(feature: Feature) -> Callable[[_Cell], tuple[float, ...] | str]:
    spelled = {v: (1.0,) for v in feature.true_values} | {v: (0.0,) for v in feature.false_values}
    problem = (
        f"is not one of the schema's true_values ({_some(feature.true_values)}) or"
        f" false_values ({_some(feature.false_values)}); fix the cell or add the spelling"
    )

    def decode(cell: _Cell) -> tuple[float, ...] | str:
        if isinstance(cell, bool):
            return (1.0,) if cell else (0.0,)
        return spelled.get(_canonical(cell), problem) if cell is not None else problem

    return decode


_DECODERS: dict[str, Callable[[Feature], Callable[[_Cell], tuple[float, ...] | str]]] = {
    "numeric": _decode_numeric,
    "categorical": _decode_categorical,
    "boolean": _decode_boolean,
}


def _encode(columns: _Columns, *, schema: DatasetSchema, source: str) -> SiteTable:
    num_rows = len(columns.locations)
    spellings = frozenset(schema.missing_values)
    features = np.zeros((num_rows, schema.num_encoded_features), dtype=np.float32)
    keep = np.ones(num_rows, dtype=bool)
    missing_per_column: Counter[str] = Counter()
    start = 0
    for feature in schema.features:
        decode = _DECODERS[feature.kind](feature)
        width = len(feature.encoded_names)
        for row, cell in enumerate(columns.cells[feature.name]):
            if _is_missing(cell, spellings):
                if schema.missing == "error":
                    raise SiteDataError(
                        f"{source!r}: column {feature.name!r}, {columns.locations[row]} is"
                        " missing a value and the schema's missing policy is 'error'; fill it"
                        " in, or set `missing: drop-row` in the schema"
                    )
                keep[row] = False
                missing_per_column[feature.name] += 1
                continue
            decoded = decode(cell)
            if isinstance(decoded, str):
                raise SiteDataError(
                    f"{source!r}: column {feature.name!r}, {columns.locations[row]} {decoded}"
                )
            features[row, start : start + width] = decoded
        start += width
    labels = np.zeros(num_rows, dtype=np.int64)
    known = ", ".join(schema.target_map)
    for row, cell in enumerate(columns.cells[schema.target]):
        index = (
            None
            if cell is None or _is_missing(cell, spellings)
            else schema.target_map.get(_canonical(cell))
        )
        if index is None:
            raise SiteDataError(
                f"{source!r}: target column {schema.target!r}, {columns.locations[row]} has a"
                f" missing label or one not among the schema's target values ({known}); every"
                " row needs a known label — fix the cell or the schema's target.classes"
            )
        labels[row] = index
    dropped = num_rows - int(keep.sum())
    # Counts per column, not rows: aggregates that help the site find the gap in its export.
    most_missing = ", ".join(
        f"{name!r} {count}" for name, count in missing_per_column.most_common(3)
    )
    if dropped == num_rows:
        raise SiteDataError(
            f"{source!r}: all {num_rows} rows have a missing value in a feature column (most"
            f" often: {most_missing}) and were dropped; fill in the data, or check the schema's"
            " missing_values spellings"
        )
    if dropped:
        logger.info(
            "%s: dropped %d of %d rows with a missing value in a feature column (most often: %s)",
            source,
            dropped,
            num_rows,
            most_missing,
        )
    return SiteTable(
        features=features[keep],
        labels=labels[keep],
        schema=schema,
        source=source,
        rows_dropped=dropped,
    )


def split_train_test(
    table: SiteTable, *, test_fraction: float, seed: int
) -> tuple[SiteTable, SiteTable]:
    """Split ``table`` into (train, test) at random, reproducibly.

    Same choice of rows as scikit-learn's ``train_test_split(test_size=test_fraction,
    random_state=seed, shuffle=True)`` without stratification: ``ceil(test_fraction * n)`` test rows
    are the first of ``np.random.RandomState(seed).permutation(n)``, the rest train. Both parts keep
    the file's row order. FLamby's Fed-Heart-Disease centres split with 0.34 / seed 43 into
    199/104, 172/89, 30/16 and 85/45 rows.

    Raises:
        ConfigError: ``test_fraction`` is not in (0, 1) or ``seed`` is not in [0, 2**32).
        SiteDataError: the table is too small for both parts to hold a row.
    """
    if isinstance(test_fraction, bool) or not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            f"test_fraction must be strictly between 0 and 1; found {test_fraction!r};"
            " use e.g. 0.34"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32); found {seed!r}; use e.g. 43")
    n = len(table)
    num_test = math.ceil(test_fraction * n)
    if num_test >= n:
        raise SiteDataError(
            f"{table.source!r}: {n} rows with test_fraction {test_fraction} leave no training"
            " row; lower test_fraction or add records"
        )
    order = np.random.RandomState(seed).permutation(n)
    test_rows, train_rows = np.sort(order[:num_test]), np.sort(order[num_test:])

    def subset(rows: npt.NDArray[np.int64]) -> SiteTable:
        return SiteTable(
            features=table.features[rows],
            labels=table.labels[rows],
            schema=table.schema,
            source=table.source,
            rows_dropped=table.rows_dropped,
        )

    return subset(train_rows), subset(test_rows)
