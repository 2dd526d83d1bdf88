"""The end-of-run report: generated for the demo federation, complete, and honest per site."""

from __future__ import annotations

import base64
import dataclasses
import math
import subprocess
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from clinfed.baselines import LOCAL_ONLY, PERSONALIZED, POOLED, add_baselines
from clinfed.config import SimulationConfig
from clinfed.server.evaluation import FEDERATED, FinalEvaluation
from clinfed.server.report import PLOT_IDS, TABLE_IDS, write_report
from clinfed.server.results import FederationResult, write_evaluation, write_results
from clinfed.simulation import run_inprocess_federation

Demo = Callable[..., SimulationConfig]
SITES = ["berlin", "nantes", "paris"]


class _Report(HTMLParser):
    """Tables (their cells' text), images (id -> src) and all text of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self.text: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or f"anonymous-{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images[a.get("id") or f"img-{len(self.images)}"] = a.get("src") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Report:
    parser = _Report()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FederationResult, Path]:
    """The demo federation (3 rounds) with every baseline, written and rendered."""
    from tests.conftest import _demo_config

    out = tmp_path_factory.mktemp("results")
    config = _demo_config("rounds=3", f"output_dir={out}")
    result = run_inprocess_federation(config)
    assert result.evaluation is not None
    folder = write_results(result, out)
    add_baselines(config, result.evaluation)
    write_evaluation(result.evaluation, folder)
    write_report(folder)
    return result, folder


def test_the_report_holds_every_site_plot_and_table(
    demo_run: tuple[FederationResult, Path],
) -> None:
    _, folder = demo_run

    report = _parse(folder / "report.html")

    assert set(TABLE_IDS) <= set(report.tables)
    for table_id in TABLE_IDS:
        first_cells = [row[0] for row in report.tables[table_id][1:]]
        assert sorted(set(first_cells)) == SITES, table_id
    for plot_id in PLOT_IDS:
        src = report.images[plot_id]
        assert src.startswith("data:image/png;base64,"), plot_id  # embedded: opens offline
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000, plot_id
    models = {row[1] for row in report.tables["table-baselines"][1:]}
    assert models == {FEDERATED, LOCAL_ONLY, POOLED, PERSONALIZED}
    text = " ".join(report.text)
    assert "SIMULATION ONLY" in text and "Worst-site summary" in text
    assert "secure aggregation ON" in text
    assert not any("http" in src[:10] for src in report.images.values())


def test_the_final_table_shows_intervals_calibration_epsilon_and_conformal(
    demo_run: tuple[FederationResult, Path],
) -> None:
    result, folder = demo_run

    rows = {r[0]: r for r in _parse(folder / "report.html").tables["table-final"][1:]}

    assert result.evaluation is not None
    for site in SITES:
        e = result.evaluation.models[FEDERATED][site]
        assert f"{e.accuracy:.3f} [{e.accuracy_low:.3f}, {e.accuracy_high:.3f}]" in rows[site][2]
        assert f"{e.epsilon:.3f}" == rows[site][5]
        assert 0 < e.epsilon <= 1.0 and 0 <= e.ece <= 1
        assert 0 <= e.conformal_abstention <= 1 and not math.isnan(e.conformal_coverage)


def test_every_interval_of_every_model_contains_its_point_estimate(
    demo_run: tuple[FederationResult, Path],
) -> None:
    result, _ = demo_run

    assert result.evaluation is not None
    for model, sites in result.evaluation.models.items():
        for site, e in sites.items():
            assert not e.error, (model, site, e.error)
            assert e.accuracy_low <= e.accuracy <= e.accuracy_high, (model, site)
            assert e.roc_auc_low <= e.roc_auc <= e.roc_auc_high, (model, site)


def test_personalization_stays_within_each_sites_epsilon(
    demo_run: tuple[FederationResult, Path],
) -> None:
    result, _ = demo_run

    assert result.evaluation is not None
    for site in SITES:
        personalized = result.evaluation.models[PERSONALIZED][site].epsilon
        assert 0.9 < personalized <= 1.0 + 1e-9  # the site's target, spent in all
        assert result.evaluation.models[LOCAL_ONLY][site].epsilon <= 1.0 + 1e-9


def test_evaluation_json_round_trips(demo_run: tuple[FederationResult, Path]) -> None:
    result, folder = demo_run
    import json

    loaded = FinalEvaluation.from_json(json.loads((folder / "evaluation.json").read_text()))

    assert result.evaluation is not None
    assert loaded.conformal == result.evaluation.conformal
    assert loaded.models[FEDERATED]["paris"].accuracy == pytest.approx(
        result.evaluation.models[FEDERATED]["paris"].accuracy
    )


def test_a_site_with_too_few_test_records_gets_a_note_not_a_crash(
    demo_config: Demo, tmp_path: Path
) -> None:
    config = demo_config(
        "rounds=2",
        "report.baselines=false",
        "secure_aggregation.enabled=false",
        f"output_dir={tmp_path}",
    )
    tiny = [
        dataclasses.replace(s, data=dataclasses.replace(s.data, test_fraction=0.05))
        if s.name == "berlin"
        else s
        for s in config.sites
    ]
    config = dataclasses.replace(config, sites=tuple(tiny))

    result = run_inprocess_federation(config)
    folder = write_results(result, tmp_path)
    report = _parse(write_report(folder))

    rows = {r[0]: r for r in report.tables["table-final"][1:]}
    assert rows["berlin"][1] == "7"
    assert "too few for a bootstrap interval" in rows["berlin"][-1]
    assert "(no interval)" in rows["berlin"][2]
    assert "[" in rows["paris"][2]  # the others keep theirs
    assert "secure aggregation OFF" in " ".join(report.text)  # never silent


def test_clinfed_report_renders_a_results_folder(
    demo_run: tuple[FederationResult, Path], repo_root: Path
) -> None:
    _, folder = demo_run
    (folder / "report.html").unlink()

    done = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "report", str(folder)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(folder / "report.html")
    assert (folder / "report.html").is_file()


@pytest.mark.parametrize("what", ["missing", "not-results"])
def test_clinfed_report_on_a_wrong_folder_is_one_line(
    what: str, tmp_path: Path, repo_root: Path
) -> None:
    folder = tmp_path / "nope" if what == "missing" else tmp_path

    done = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "report", str(folder)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("clinfed: error: ")


def test_conformal_coverage_on_each_sites_test_split_over_seeds(demo_config: Demo) -> None:
    alpha, seeds = 0.1, (0, 1, 2)
    coverage: dict[int, dict[str, float]] = {}
    for seed in seeds:
        config = demo_config(
            f"seed={seed}",
            f"report.alpha={alpha}",
            "report.baselines=false",
            "secure_aggregation.enabled=false",  # same sums, faster; covered by the fixture
        )
        config = dataclasses.replace(
            config,
            sites=tuple(dataclasses.replace(s, noise_seed=100 + seed) for s in config.sites),
        )

        result = run_inprocess_federation(config)

        assert result.evaluation is not None
        sites = result.evaluation.models[FEDERATED]
        coverage[seed] = {s: e.conformal_coverage for s, e in sites.items()}
        n = {s: e.num_examples for s, e in sites.items()}
        pooled = sum(coverage[seed][s] * n[s] for s in n) / sum(n.values())
        assert pooled >= 1 - alpha - 0.05, (seed, coverage[seed])  # all test patients
    for site in SITES:  # each site's test split, over the seeds
        mean = sum(c[site] for c in coverage.values()) / len(seeds)
        assert mean >= 1 - alpha - 0.05, (site, coverage)


def test_site_scope_conformal_never_lowers_the_federation_threshold(
    demo_config: Demo, tmp_path: Path
) -> None:
    config = demo_config(
        "rounds=3", "report.conformal_scope=site", "report.baselines=false", "report.alpha=0.2"
    )

    result = run_inprocess_federation(config)

    assert result.evaluation is not None
    conformal = result.evaluation.conformal
    assert conformal.scope == "site" and not math.isnan(conformal.threshold)
    for e in result.evaluation.models[FEDERATED].values():
        assert e.conformal_threshold >= conformal.threshold
        assert 0 <= e.conformal_coverage <= 1
    folder = write_results(result, tmp_path)
    rows = _parse(write_report(folder)).tables["table-conformal"][1:]
    assert sorted(r[0] for r in rows) == SITES
    assert all(float(r[2]) >= conformal.threshold for r in rows)


def test_a_site_whose_policy_keeps_the_report_in_gets_a_note_not_a_crash(
    demo_config: Demo, tmp_path: Path
) -> None:
    from tests.client.test_governance_federation import _governed

    config = demo_config("rounds=2", "report.baselines=false")
    config = _governed(config, tmp_path / "sites")
    # Paris' hospital lets only the training and evaluation metrics out, not the report's.
    policy = tmp_path / "sites" / "paris" / "policy.yaml"
    text = policy.read_text()
    policy.write_text(text[: text.index("    # the end-of-run report")] + "]\n")

    result = run_inprocess_federation(config)
    folder = write_results(result, tmp_path / "results")
    rows = {r[0]: r for r in _parse(write_report(folder)).tables["table-final"][1:]}

    assert result.evaluation is not None
    assert "egress.allowed_metrics" in result.evaluation.models[FEDERATED]["paris"].error
    assert "no result" in rows["paris"][-1]
    assert not result.evaluation.models[FEDERATED]["nantes"].error
    assert not math.isnan(result.evaluation.conformal.threshold)  # from the other two sites
