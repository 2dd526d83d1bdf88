"""Derive the per-hospital site files of the UCI Heart Disease data from the raw file.

Reads ``heart_disease_uci.csv`` (kept byte-identical to its source, see PROVENANCE.md), applies the
one known fix — the row with ``id`` 304 is labelled Cleveland but is the first Hungarian patient —
and writes one CSV per hospital into ``sites/`` with the raw columns minus ``dataset`` (``id`` is
kept). Prints the SHA-256 of every file in ``sha256sum`` format, paths relative to this directory.

    python data/heart-disease/make_sites.py           # (re)write sites/*.csv
    python data/heart-disease/make_sites.py --check   # only verify that sites/*.csv are up to date

Standard library only, so that a hospital can rerun it without installing anything.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAW = HERE / "heart_disease_uci.csv"
SITES = HERE / "sites"

RAW_SHA256 = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"
HOSPITAL_COLUMN = "dataset"
# Raw hospital label -> site file name.
SITE_FILES = {
    "Cleveland": "cleveland.csv",
    "Hungary": "hungary.csv",
    "Switzerland": "switzerland.csv",
    "VA Long Beach": "va-long-beach.csv",
}
# id 304 (age 28) opens processed.hungarian.data in the UCI archive but is labelled Cleveland here.
RELABEL = {"304": ("Cleveland", "Hungary")}
EXPECTED_COUNTS = {"Cleveland": 303, "Hungary": 294, "Switzerland": 123, "VA Long Beach": 200}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_sites(raw: bytes) -> dict[str, bytes]:
    """Return the bytes of each site file, keyed by file name."""
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8"), newline=""))
    header = list(reader.fieldnames or [])
    if HOSPITAL_COLUMN not in header or "id" not in header:
        raise SystemExit(
            f"{RAW.name}: expected columns 'id' and '{HOSPITAL_COLUMN}', found {header}"
        )
    out_columns = [c for c in header if c != HOSPITAL_COLUMN]
    rows: dict[str, list[dict[str, str]]] = {name: [] for name in SITE_FILES}
    for row in reader:
        if row["id"] in RELABEL:
            wrong, right = RELABEL[row["id"]]
            if row[HOSPITAL_COLUMN] not in (wrong, right):
                raise SystemExit(f"{RAW.name}: row id {row['id']} has an unexpected hospital label")
            row[HOSPITAL_COLUMN] = right
        hospital = row[HOSPITAL_COLUMN]
        if hospital not in rows:
            raise SystemExit(f"{RAW.name}: unknown hospital label {hospital!r}")
        rows[hospital].append(row)
    counts = {name: len(r) for name, r in rows.items()}
    if counts != EXPECTED_COUNTS:
        raise SystemExit(f"{RAW.name}: row counts {counts} differ from {EXPECTED_COUNTS}")
    files: dict[str, bytes] = {}
    for hospital, file_name in SITE_FILES.items():
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(
            buffer, fieldnames=out_columns, extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows[hospital])
        files[file_name] = buffer.getvalue().encode("utf-8")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify sites/ instead of writing it")
    args = parser.parse_args(argv)

    raw = RAW.read_bytes()
    if sha256_of(raw) != RAW_SHA256:
        print(f"{RAW.name}: SHA-256 differs from the recorded {RAW_SHA256}", file=sys.stderr)
        return 1
    files = build_sites(raw)
    stale = []
    if not args.check:
        SITES.mkdir(exist_ok=True)
    for file_name, data in files.items():
        path = SITES / file_name
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(path.name)
        else:
            path.write_bytes(data)
    print(f"{RAW_SHA256}  {RAW.name}")
    for file_name, data in files.items():
        print(f"{sha256_of(data)}  sites/{file_name}")
    if stale:
        print(f"out of date: {', '.join(stale)}; rerun without --check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
