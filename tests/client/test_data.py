"""Site data: the shipped heart-disease files, schema parsing, loading, validation and the split."""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinfed.client.data import (
    DatasetSchema,
    Feature,
    SiteTable,
    load_schema,
    load_site_table,
    split_train_test,
)
from clinfed.errors import ConfigError, SiteDataError

DATA = Path(__file__).resolve().parents[2] / "data" / "heart-disease"
SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")
RAW_ROWS = {"cleveland": 303, "hungary": 294, "switzerland": 123, "va-long-beach": 200}
# FLamby Fed-Heart-Disease: rows left after dropping missing values, then train/test sizes.
FLAMBY = {
    "cleveland": (303, 199, 104),
    "hungary": (261, 172, 89),
    "switzerland": (46, 30, 16),
    "va-long-beach": (130, 85, 45),
}

# A distinctive cell value: it must never appear in an error message or a log line.
SECRET = "987654"

SMALL_SCHEMA = """\
features:
  - {name: age, type: numeric, min: 0, max: 120}
  - {name: sex, type: categorical, levels: [Female, Male]}
  - {name: fbs, type: boolean, true_values: [TRUE], false_values: [FALSE]}
target:
  column: num
  classes:
    - {name: no disease, values: [0]}
    - {name: disease, values: [1, 2, 3, 4]}
missing: drop-row
ignore: [id]
"""
SMALL_CSV = """\
id,age,sex,fbs,num
1,63,Male,TRUE,0
2,67,Female,FALSE,2
3,,Male,FALSE,1
4,41,Female,,0
5,58,Male,TRUE,4
"""


def small_schema(tmp_path: Path, text: str = SMALL_SCHEMA) -> DatasetSchema:
    path = tmp_path / "schema.yaml"
    path.write_text(text, encoding="utf-8")
    return load_schema(path)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def index_table(n: int) -> SiteTable:
    """A table whose only feature is the row's position, to follow rows through a split."""
    schema = DatasetSchema(
        features=(Feature(name="i", kind="numeric"),),
        target="y",
        class_names=("a", "b"),
        target_map={"0": 0, "1": 1},
    )
    return SiteTable(
        features=np.arange(n, dtype=np.float32).reshape(n, 1),
        labels=(np.arange(n) % 2).astype(np.int64),
        schema=schema,
        source="index.csv",
    )


def assert_one_line(error: pytest.ExceptionInfo[SiteDataError], *must_contain: str) -> None:
    message = str(error.value)
    assert "\n" not in message and "\r" not in message
    for text in must_contain:
        assert text in message
    assert SECRET not in message


# --- the shipped data ----------------------------------------------------------------------------


def test_site_files_hold_the_hospitals_rows_after_the_id_304_fix() -> None:
    # Arrange
    counts = {}
    ids: list[int] = []
    # Act
    for site in SITES:
        with (DATA / "sites" / f"{site}.csv").open(newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        counts[site] = len(rows)
        ids += [int(row["id"]) for row in rows]
        assert "dataset" not in rows[0]
    # Assert
    assert counts == RAW_ROWS
    assert sorted(ids) == list(range(1, 921))
    with (DATA / "sites" / "hungary.csv").open(newline="", encoding="utf-8") as file:
        assert next(csv.DictReader(file))["id"] == "304"


def test_provenance_checksums_match_the_files() -> None:
    # Arrange
    text = (DATA / "PROVENANCE.md").read_text(encoding="utf-8")
    # Act
    recorded = dict(
        (name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)
    )
    # Assert
    assert set(recorded) == {"heart_disease_uci.csv", *(f"sites/{s}.csv" for s in SITES)}
    for name, digest in recorded.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


def test_make_sites_reproduces_the_checked_in_files() -> None:
    # Act
    result = subprocess.run(
        [sys.executable, str(DATA / "make_sites.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    # Assert
    assert result.returncode == 0, result.stderr
    assert "sites/cleveland.csv" in result.stdout


@pytest.mark.parametrize("schema_name", ["schema-binary.yaml", "schema-severity.yaml"])
@pytest.mark.parametrize("site", SITES)
def test_demo_sites_load_and_split_like_flamby(site: str, schema_name: str) -> None:
    # Arrange
    schema = load_schema(DATA / schema_name)
    rows, train_rows, test_rows = FLAMBY[site]
    # Act
    table = load_site_table(DATA / "sites" / f"{site}.csv", schema)
    train, test = split_train_test(table, test_fraction=0.34, seed=43)
    # Assert
    assert (len(table), table.rows_dropped) == (rows, RAW_ROWS[site] - rows)
    assert (len(train), len(test)) == (train_rows, test_rows)
    assert table.features.dtype == np.float32 and table.labels.dtype == np.int64
    assert table.features.shape == (rows, schema.num_encoded_features)
    assert table.source == f"{site}.csv"
    assert set(np.unique(table.labels)) <= set(range(schema.num_classes))


def test_shipped_schemas_describe_flamby_features() -> None:
    # Act
    binary = load_schema(DATA / "schema-binary.yaml")
    severity = load_schema(DATA / "schema-severity.yaml")
    # Assert
    assert [f.name for f in binary.features] == [
        "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak",
    ]  # fmt: skip
    assert binary.encoded_feature_names[:4] == (
        "age",
        "sex=Female",
        "sex=Male",
        "cp=typical angina",
    )
    assert binary.num_encoded_features == 16
    assert (binary.num_classes, severity.num_classes) == (2, 5)
    assert dict(binary.target_map) == {"0": 0, "1": 1, "2": 1, "3": 1, "4": 1}
    assert dict(severity.target_map) == {str(i): i for i in range(5)}
    assert binary.ignore == ("id", "slope", "ca", "thal")
    assert binary.missing == "drop-row"


# --- encoding ------------------------------------------------------------------------------------


def test_load_encodes_numeric_categorical_boolean_and_drops_missing_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange
    schema = small_schema(tmp_path)
    header, *records = SMALL_CSV.splitlines()
    text = "\n".join([f"{header},notes", *(f"{line},{SECRET}" for line in records)])
    path = write(tmp_path, "site.csv", text + "\n")
    # Act
    with caplog.at_level(logging.INFO, logger="clinfed.client.data"):
        table = load_site_table(path, schema)
    # Assert
    assert schema.encoded_feature_names == ("age", "sex=Female", "sex=Male", "fbs")
    np.testing.assert_array_equal(
        table.features,
        np.array([[63, 0, 1, 1], [67, 1, 0, 0], [58, 0, 1, 1]], dtype=np.float32),
    )
    np.testing.assert_array_equal(table.labels, np.array([0, 1, 1]))
    assert table.rows_dropped == 2
    logged = caplog.text
    assert "dropped 2 of 5 rows" in logged and "'notes'" in logged
    assert SECRET not in logged


def test_integral_floats_match_levels_and_targets(tmp_path: Path) -> None:
    # Arrange: a numerically coded categorical column and target, written as floats.
    schema = small_schema(
        tmp_path, SMALL_SCHEMA.replace("levels: [Female, Male]", "levels: [0, 1]")
    )
    path = write(tmp_path, "site.csv", "id,age,sex,fbs,num\n1,63,1.0,TRUE,2.0\n2,50, 0 ,FALSE,0\n")
    # Act
    table = load_site_table(path, schema)
    # Assert
    np.testing.assert_array_equal(table.features[:, 1:3], [[0, 1], [1, 0]])
    np.testing.assert_array_equal(table.labels, [1, 0])


def test_yaml_scalars_stay_text(tmp_path: Path) -> None:
    # Arrange: YAML 1.1 would read these as booleans and integers.
    text = SMALL_SCHEMA.replace("[Female, Male]", "[no, yes, 007]")
    # Act
    schema = small_schema(tmp_path, text)
    # Assert
    assert schema.features[1].levels == ("no", "yes", "007")
    assert schema.features[2].true_values == ("TRUE",)


@pytest.mark.parametrize("typed", [True, False], ids=["typed-parquet", "text-parquet"])
@pytest.mark.parametrize("site", ["hungary", "va-long-beach"])
def test_csv_and_parquet_give_identical_tables(tmp_path: Path, site: str, typed: bool) -> None:
    # Arrange
    schema = load_schema(DATA / "schema-binary.yaml")
    csv_path = DATA / "sites" / f"{site}.csv"
    if typed:  # pyarrow infers int/double/bool columns with nulls
        arrow = pa_csv.read_csv(csv_path)
        assert pa.types.is_boolean(arrow.schema.field("fbs").type)
    else:  # every column as text, empty cells as ""
        with csv_path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        arrow = pa.table({name: [row[name] for row in rows] for name in rows[0]})
    parquet_path = tmp_path / f"{site}.parquet"
    pq.write_table(arrow, parquet_path)
    # Act
    from_csv = load_site_table(csv_path, schema)
    from_parquet = load_site_table(parquet_path, schema)
    # Assert
    np.testing.assert_array_equal(from_csv.features, from_parquet.features)
    np.testing.assert_array_equal(from_csv.labels, from_parquet.labels)
    assert from_csv.rows_dropped == from_parquet.rows_dropped
    assert from_parquet.source == f"{site}.parquet"


# --- the split -----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete() -> None:
    # Arrange
    table = index_table(50)
    # Act
    train, test = split_train_test(table, test_fraction=0.34, seed=43)
    train2, test2 = split_train_test(table, test_fraction=0.34, seed=43)
    _, other_test = split_train_test(table, test_fraction=0.34, seed=44)
    # Assert
    train_ids, test_ids = train.features[:, 0], test.features[:, 0]
    np.testing.assert_array_equal(train_ids, train2.features[:, 0])
    np.testing.assert_array_equal(test_ids, test2.features[:, 0])
    assert not set(train_ids) & set(test_ids)
    assert sorted([*train_ids, *test_ids]) == list(range(50))
    assert list(test_ids) == sorted(test_ids)  # file order kept
    assert (len(train), len(test)) == (33, 17)
    assert set(other_test.features[:, 0]) != set(test_ids)
    np.testing.assert_array_equal(test.labels, test_ids.astype(np.int64) % 2)


def test_split_picks_the_rows_of_sklearn_shuffle_split() -> None:
    # Arrange: sklearn's ShuffleSplit takes the first ceil(0.34 n) of RandomState(43).permutation.
    table = index_table(10)
    # Act
    _, test = split_train_test(table, test_fraction=0.34, seed=43)
    # Assert
    assert list(test.features[:, 0]) == [3, 6, 8, 9]


@pytest.mark.parametrize(
    ("fraction", "seed"),
    [(0.0, 1), (1.0, 1), (-0.1, 1), (float("nan"), 1), (0.3, -1), (0.3, 2**32)],
)
def test_split_refuses_bad_settings(fraction: float, seed: int) -> None:
    with pytest.raises(ConfigError):
        split_train_test(index_table(10), test_fraction=fraction, seed=seed)


def test_split_refuses_a_table_too_small_for_two_parts() -> None:
    with pytest.raises(SiteDataError, match="no training row"):
        split_train_test(index_table(1), test_fraction=0.34, seed=43)


# --- bad data files ------------------------------------------------------------------------------

# (file name, file content, a column the message must name; "" = file-level problem)
BAD_FILES = {
    "wrong type": ("s.csv", f"age,sex,fbs,num\n63,Male,TRUE,0\nx{SECRET},Male,TRUE,0\n", "'age'"),
    "infinite number": ("s.csv", "age,sex,fbs,num\n1e999,Male,TRUE,0\n", "'age'"),
    "above max": ("s.csv", f"age,sex,fbs,num\n{SECRET},Male,TRUE,0\n", "'age'"),
    "below min": ("s.csv", f"age,sex,fbs,num\n-{SECRET},Male,TRUE,0\n", "'age'"),
    "unknown level": ("s.csv", f"age,sex,fbs,num\n63,F{SECRET},TRUE,0\n", "'sex'"),
    "unknown boolean": ("s.csv", f"age,sex,fbs,num\n63,Male,yes{SECRET},0\n", "'fbs'"),
    "missing label": ("s.csv", "age,sex,fbs,num\n63,Male,TRUE,\n", "'num'"),
    "unknown label": ("s.csv", f"age,sex,fbs,num\n63,Male,TRUE,{SECRET}\n", "'num'"),
    "column absent": ("s.csv", "age,fbs,num\n63,TRUE,0\n", "'sex'"),
    "duplicate column": ("s.csv", "age,sex,age,fbs,num\n63,Male,63,TRUE,0\n", "'age'"),
    "all rows dropped": ("s.csv", "age,sex,fbs,num\n,Male,TRUE,0\n,,TRUE,1\n", "'age' 2"),
    "ragged row": ("s.csv", f"age,sex,fbs,num\n63,Male,TRUE,0,{SECRET}\n", "line 2"),
    "empty file": ("s.csv", "", "empty"),
    "header only": ("s.csv", "age,sex,fbs,num\n", "no data rows"),
    "not csv or parquet": ("s.xlsx", "age\n1\n", ".xlsx"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_file_raises_one_line_error_naming_file_and_column(tmp_path: Path, case: str) -> None:
    # Arrange
    schema = small_schema(tmp_path)
    name, content, column = BAD_FILES[case]
    path = write(tmp_path, name, content)
    # Act / Assert
    with pytest.raises(SiteDataError) as error:
        load_site_table(path, schema)
    assert_one_line(error, name, column)


def test_missing_value_under_error_policy_is_refused(tmp_path: Path) -> None:
    schema = small_schema(tmp_path, SMALL_SCHEMA.replace("missing: drop-row", "missing: error"))
    path = write(tmp_path, "s.csv", SMALL_CSV)
    with pytest.raises(SiteDataError) as error:
        load_site_table(path, schema)
    assert_one_line(error, "'age'", "line 4", "missing: drop-row")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError) as error:
        load_site_table(tmp_path / "absent.csv", small_schema(tmp_path))
    assert_one_line(error, "absent.csv", "does not exist")


def test_directory_and_undecodable_files_are_refused(tmp_path: Path) -> None:
    schema = small_schema(tmp_path)
    (tmp_path / "dir.csv").mkdir()
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("age,sex,fbs,num\n63,Mäle,TRUE,0\n".encode("latin-1"))
    for path in (tmp_path / "dir.csv", latin1):
        with pytest.raises(SiteDataError) as error:
            load_site_table(path, schema)
        assert_one_line(error, path.name)


def test_corrupt_and_unsupported_parquet_are_refused(tmp_path: Path) -> None:
    # Arrange
    schema = small_schema(tmp_path)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet PAR1")
    dated = tmp_path / "dated.parquet"
    pq.write_table(
        pa.table(
            {
                "age": pa.array([datetime.date(2020, 1, 1)]),
                "sex": ["Male"],
                "fbs": [True],
                "num": [0],
            }
        ),
        dated,
    )
    bad_text = tmp_path / "bad-text.parquet"
    offsets = pa.py_buffer(np.array([0, 1], dtype=np.int32).tobytes())
    not_utf8 = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"\x80")])
    pq.write_table(
        pa.table({"age": [63], "sex": not_utf8, "fbs": [True], "num": [0]}),
        bad_text,
    )
    # Act / Assert
    with pytest.raises(SiteDataError) as error:
        load_site_table(corrupt, schema)
    assert_one_line(error, "corrupt.parquet")
    with pytest.raises(SiteDataError) as error:
        load_site_table(bad_text, schema)
    assert_one_line(error, "bad-text.parquet", "'sex'", "UTF-8")
    with pytest.raises(SiteDataError) as error:
        load_site_table(dated, schema)
    assert_one_line(error, "dated.parquet", "'age'")


# --- bad schemas ---------------------------------------------------------------------------------

BAD_SCHEMAS = {
    "yaml syntax": ("features: [unclosed", "line 1"),
    "unknown key": (SMALL_SCHEMA.replace("min: 0", "minimum: 0"), "features[0]"),
    "unknown type": (SMALL_SCHEMA.replace("type: numeric", "type: number"), "features[0].type"),
    "no target": (SMALL_SCHEMA.split("target:", maxsplit=1)[0], "target"),
    "no levels": (SMALL_SCHEMA.replace(", levels: [Female, Male]", ""), "'sex'"),
    "min above max": (SMALL_SCHEMA.replace("max: 120", "max: -1"), "'age'"),
    "bad number": (SMALL_SCHEMA.replace("max: 120", "max: lots"), "features[0].max"),
    "duplicate key": (SMALL_SCHEMA + "missing: error\n", "'missing'"),
    "bad policy": (SMALL_SCHEMA.replace("missing: drop-row", "missing: impute"), "missing"),
    "value in two classes": (SMALL_SCHEMA.replace("[1, 2, 3, 4]", "[0, 1]"), "target.classes"),
    "one class": (SMALL_SCHEMA.split("    - {name: disease", maxsplit=1)[0], "target.classes"),
    "duplicate feature": (SMALL_SCHEMA.replace("name: sex", "name: age"), "'age'"),
    "boolean both ways": (SMALL_SCHEMA.replace("[FALSE]", "[TRUE]"), "'fbs'"),
    "target also ignored": (SMALL_SCHEMA.replace("ignore: [id]", "ignore: [id, num]"), "'num'"),
    "not a mapping": ("- just\n- a list\n", "mapping"),
    "empty": ("", "mapping"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_SCHEMAS, ids=list(BAD_SCHEMAS))
def test_bad_schema_raises_one_line_error_naming_file_and_key(tmp_path: Path, case: str) -> None:
    # Arrange
    text, key = BAD_SCHEMAS[case]
    path = write(tmp_path, "bad-schema.yaml", text)
    # Act / Assert
    with pytest.raises(SiteDataError) as error:
        load_schema(path)
    assert_one_line(error, "bad-schema.yaml", key)


def test_missing_schema_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError) as error:
        load_schema(tmp_path / "nowhere.yaml")
    assert_one_line(error, "nowhere.yaml", "does not exist")


# --- property tests: whatever the bytes, a SiteDataError or a table ------------------------------

BASE_CSV = (DATA / "sites" / "hungary.csv").read_bytes()[:1200]

mutations = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete", "truncate"]),
        st.integers(min_value=0, max_value=len(BASE_CSV)),
        st.binary(min_size=1, max_size=8)
        | st.text(min_size=1, max_size=8).map(str.encode)
        | st.sampled_from([b",", b'"', b"\n", b"\r", b"\x00", b"\xff", b"nan", b"1e999", b"-"]),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    for op, position, chunk in edits:
        at = min(position, len(data))
        if op == "replace":
            data = data[:at] + chunk + data[at + len(chunk) :]
        elif op == "insert":
            data = data[:at] + chunk + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + len(chunk) :]
        else:
            data = data[:at]
    return data


def load_or_site_error(path: Path, schema: DatasetSchema) -> None:
    try:
        table = load_site_table(path, schema)
    except SiteDataError as error:
        assert "\n" not in str(error) and "\r" not in str(error)
    else:
        assert len(table) > 0
        assert np.isfinite(table.features).all()
        assert set(np.unique(table.labels)) <= set(range(schema.num_classes))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corrupt")


@pytest.fixture(scope="module")
def binary_schema() -> DatasetSchema:
    return load_schema(DATA / "schema-binary.yaml")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=mutations)
def test_corrupted_csv_bytes_load_or_raise_site_data_error(
    scratch: Path, binary_schema: DatasetSchema, edits: list[tuple[str, int, bytes]]
) -> None:
    path = scratch / "bytes.csv"
    path.write_bytes(mutate(BASE_CSV, edits))
    load_or_site_error(path, binary_schema)


cells = st.text(max_size=6) | st.sampled_from(["", "TRUE", "NaN", "inf", "1e40", "-0", "4.0", "?"])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_csv_cells_load_or_raise_site_data_error(
    scratch: Path, binary_schema: DatasetSchema, data: st.DataObject
) -> None:
    rows = list(csv.reader(io.StringIO(BASE_CSV.decode(), newline="")))[:-1]
    for _ in range(data.draw(st.integers(1, 4))):
        row = data.draw(st.integers(0, len(rows) - 1))
        column = data.draw(st.integers(0, len(rows[0]) - 1))
        rows[row][column] = data.draw(cells)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    path = scratch / "cells.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    load_or_site_error(path, binary_schema)


@settings(max_examples=60, deadline=None)
@given(edits=mutations)
def test_corrupted_parquet_bytes_load_or_raise_site_data_error(
    scratch: Path, binary_schema: DatasetSchema, edits: list[tuple[str, int, bytes]]
) -> None:
    clean = scratch / "clean.parquet"
    if not clean.exists():
        pq.write_table(pa_csv.read_csv(io.BytesIO(BASE_CSV.rsplit(b"\n", 1)[0])), clean)
    path = scratch / "bytes.parquet"
    path.write_bytes(mutate(clean.read_bytes(), edits))
    load_or_site_error(path, binary_schema)


@settings(max_examples=100, deadline=None)
@given(edits=mutations)
def test_corrupted_schema_bytes_load_or_raise_site_data_error(
    scratch: Path, edits: list[tuple[str, int, bytes]]
) -> None:
    path = scratch / "schema.yaml"
    path.write_bytes(mutate(SMALL_SCHEMA.encode(), edits))
    try:
        load_schema(path)
    except SiteDataError as error:
        assert "\n" not in str(error) and "\r" not in str(error)
