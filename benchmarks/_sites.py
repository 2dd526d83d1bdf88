"""Synthetic federations of N sites cut from the four Fed-Heart-Disease cohorts (benchmarks only).

The complete records of Cleveland, Hungary, Switzerland and VA Long Beach (those that survive the
schema's ``missing: drop-row``; 740 in all) are shuffled with a fixed seed and dealt round-robin
into ``N`` sites: every site holds a disjoint slice, and the federation's total training work per
round is the same whatever ``N`` is. Each site gets its own CSV (the original header and rows,
unchanged) and its own site config YAML, shaped like ``conf/sites/*.yaml`` with absolute paths.
With ``governance=True`` the sites keep the demo sites' governance (``conf/policies/demo-policy.yaml``,
and a fresh ledger and audit log per simulated run); by default they have none, so that a
benchmark measures the federation without the governance's per-request file I/O.
A site needs at least :data:`MIN_ROWS` records; ``resample=True`` instead draws
``rows_per_site`` records per site (without replacement within a site; sites may overlap), for
federations larger than the data allow.
"""

from __future__ import annotations

import csv
import dataclasses
import random
from pathlib import Path

from benchmarks.common import DATA_DIR, SITES_DIR
from clinfed.client.data import load_schema
from clinfed.config import SiteGovernanceConfig, load_site_config, to_yaml

__all__ = ["MIN_ROWS", "complete_rows", "make_sites"]

MIN_ROWS = 20
"""Fewest records a synthetic site may hold (two thirds of them train, with a 0.34 test split)."""

SCHEMA = DATA_DIR / "schema-binary.yaml"
COHORTS = ("cleveland", "hungary", "switzerland", "va-long-beach")


def complete_rows() -> tuple[list[str], list[list[str]]]:
    """The CSV header and every record with no missing value in a column the schema uses."""
    schema = load_schema(str(SCHEMA))
    used = [f.name for f in schema.features] + [schema.target]
    header: list[str] = []
    rows: list[list[str]] = []
    for cohort in COHORTS:
        with (DATA_DIR / "sites" / f"{cohort}.csv").open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            index = [header.index(c) for c in used]
            rows += [r for r in reader if all(r[i].strip() != "" for i in index)]
    return header, rows


def make_sites(
    num_sites: int,
    folder: Path,
    *,
    seed: int = 0,
    resample: bool = False,
    rows_per_site: int = 60,
    governance: bool = False,
) -> list[Path]:
    """Write ``num_sites`` site CSVs and site configs into ``folder``; return the configs' paths.

    Sites are named ``site01``, ``site02``, ...; each has its own ``noise_seed`` (simulation only).
    Raises ValueError when a site would hold fewer than :data:`MIN_ROWS` records.
    """
    header, rows = complete_rows()
    rng = random.Random(seed)
    rng.shuffle(rows)
    if resample:
        if not MIN_ROWS <= rows_per_site <= len(rows):
            raise ValueError(
                f"rows_per_site must be in {MIN_ROWS}..{len(rows)}; found {rows_per_site}."
            )
        parts = [rng.sample(rows, rows_per_site) for _ in range(num_sites)]
    else:
        if num_sites < 1 or len(rows) // num_sites < MIN_ROWS:
            raise ValueError(
                f"{len(rows)} complete records cannot be split into {num_sites} sites of at "
                f"least {MIN_ROWS} records each; use resample=True or fewer sites."
            )
        parts = [rows[i::num_sites] for i in range(num_sites)]
    template = load_site_config(SITES_DIR / "paris.yaml")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(parts):
        name = f"site{i + 1:02d}"
        csv_path = folder / f"{name}.csv"
        with csv_path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(part)
        data = dataclasses.replace(template.data, path=str(csv_path), schema=str(SCHEMA))
        site = dataclasses.replace(
            template,
            name=name,
            data=data,
            noise_seed=i + 1,
            governance=template.governance if governance else SiteGovernanceConfig(),
        )
        config_path = folder / f"{name}.yaml"
        config_path.write_text(to_yaml(site), encoding="utf-8")
        paths.append(config_path)
    return paths
