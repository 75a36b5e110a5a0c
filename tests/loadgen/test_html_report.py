"""DIR/report.html from a real `disco load` run on loopback, opened in a real headless browser.

Chromium is Debian's package (``.ci/install`` installs it as root where apt-get exists); missing,
these tests skip here and fail in CI (tests/needs.py). The browser only reads ``file://`` pages
(the flags keep it off the network); each call is bounded by ``BROWSER_TIMEOUT_S``. What is
asserted is what the browser rendered (``--dump-dom`` after the page's load event): the tables'
numbers against summary.json's, every inline plot decoded (the page's own script records
``naturalWidth > 0`` on each image), the links resolved by the browser to files that exist.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from needs import missing

from disco.cluster import cli
from disco.loadgen.html_report import RUN_KEYS, SPLIT_KEYS, cell_text, write_report
from disco.loadgen.mock_server import MockConfig, MockServer

BROWSER_TIMEOUT_S = 60
# What a headless Chromium needs on this closed network (no sandbox as root, no GPU, no
# background connections: they are refused here, many at a time).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")  # fmt: skip
LABEL = "mock <&> run"  # escaped in the page, shown as is


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    missing("needs a headless Chromium (Debian: apt-get install chromium; .ci/install does)")


def browse(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()],
        capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, cwd=tmp,
    )  # fmt: skip


def dump_dom(page: Path, tmp: Path) -> Dom:
    p = browse(page, tmp, "--dump-dom")
    assert p.returncode == 0 and "</html>" in p.stdout, p.stderr[-2000:]
    dom = Dom()
    dom.feed(p.stdout)
    return dom


class Dom(HTMLParser):
    """What the tests read back from the rendered page: tables by id (rows of cells: attributes
    and text), images, links, and the text of elements with an id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[tuple[dict, str]]]] = {}
        self.images: list[dict] = []
        self.links: list[dict] = []
        self.texts: dict[str, str] = {}
        self._tables: list[str | None] = []
        self._cell: tuple[dict, list[str]] | None = None
        self._ids: list[tuple[str, str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._tables.append(a.get("id"))
            if a.get("id"):
                self.tables[a["id"]] = []
        elif tag == "tr" and self._tables and self._tables[-1]:
            self.tables[self._tables[-1]].append([])
        elif tag in ("td", "th") and self._tables and self._tables[-1]:
            self._cell = (a, [])
        elif tag == "img":
            self.images.append(a)
        elif tag == "a":
            self.links.append(a)
        if "id" in a and tag not in ("table", "img"):
            self._ids.append((tag, a["id"], []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._tables:
            self._tables.pop()
        elif tag in ("td", "th") and self._cell is not None and self._tables[-1]:
            attrs, text = self._cell
            self.tables[self._tables[-1]][-1].append((attrs, "".join(text).strip()))
            self._cell = None
        if self._ids and self._ids[-1][0] == tag:
            _, ident, text = self._ids.pop()
            self.texts[ident] = "".join(text).strip()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1].append(data)
        for _, _, text in self._ids:
            text.append(data)

    def cells(self, table: str) -> dict[str, tuple[dict, str]]:
        """A table's value cells by their summary key (``data-key``)."""
        return {a["data-key"]: (a, t) for row in self.tables[table] for a, t in row
                if "data-key" in a}  # fmt: skip


def _trace(path: Path, n: int) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:15:{10 + i * 0.1:010.7f},{30 + 7 * i},{20 + i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `disco load` run (5 requests, a mock device agent with counters and a hand-over)
    into DIR: the command writes DIR/report.html itself."""
    chromium()  # no browser: skip before spending the run
    tmp = tmp_path_factory.mktemp("html-report")
    cfg = MockConfig(ttft_s=0.01, tbt_s=0.002, source="server", metrics=True,
                     handover_at={"r000002": 3})  # fmt: skip
    out = tmp / "run"
    with MockServer(cfg) as srv:
        rc = cli.main([
            "load", "--target", srv.url, "--trace", str(_trace(tmp / "t.csv", 5)),
            "--max-tokens", "6", "--tokenizer", "estimate", "--label", LABEL, "--out", str(out),
        ])  # fmt: skip
    assert rc == 0
    return out


def test_the_report_renders_the_runs_numbers_plots_and_links(run_dir: Path, tmp_path: Path):
    report = run_dir / "report.html"
    assert report.is_file(), "disco load writes DIR/report.html"
    page = report.read_text(encoding="utf-8")
    assert "<script src" not in page and "<link" not in page  # self-contained
    summary = json.loads((run_dir / "summary.json").read_text())
    dom = dump_dom(report, tmp_path)

    # The tables: every number as summary.json has it, shown as the CLI's tables show it.
    checked = 0
    for table, keys in (("summary-run", RUN_KEYS), ("summary-split", SPLIT_KEYS)):
        cells = dom.cells(table)
        expected = [k for k in keys if k in summary and not isinstance(summary[k], dict | list)]
        assert set(cells) == set(expected), table
        for key, (attrs, text) in cells.items():
            assert json.loads(attrs["data-value"]) == summary[key], key
            assert text == cell_text(key, summary[key]), key
            checked += 1
    assert checked >= 30
    run = dom.cells("summary-run")
    assert run["requests"][1] == "5" and run["errors"][1] == "0" and run["label"][1] == LABEL
    assert run["ttft_p99_s"][1] == f"{summary['ttft_p99_s'] * 1000:.0f}"  # shown in ms
    split = dom.cells("summary-split")
    assert split["handovers"][1] == "1" and split["migrations"][1] == "1"
    assert split["server_cost_usd"][1] == f"{summary['server_cost_usd']:.2e}"
    # ...and the exact value beside each one, as the browser shows it.
    for row in dom.tables["summary-run"][1:]:
        key, raw = row[2][1], row[3][1]
        assert json.loads(raw) == summary[key], key

    # Every plot of the folder, inline, decoded by the browser.
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert {"ttft_cdf.png", "tbt_cdf.png", "timeline.png", "load.png"} <= set(pngs)
    assert sorted(i["data-file"] for i in dom.images) == pngs
    for img in dom.images:
        assert img["data-decoded"] == "yes", img["data-file"]
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == (run_dir / img["data-file"]).read_bytes()
    assert dom.texts["plots-status"] == f"{len(pngs)} of {len(pngs)} plots decoded"

    # Links, as the browser resolved them: Locust's report and the run's files exist.
    locust = [a for a in dom.links if a.get("data-kind") == "locust"]
    assert [a["href"] for a in locust] == ["locust.html"]
    for a in dom.links:
        url = urlsplit(a["data-resolved"])
        assert url.scheme == "file"
        target = Path(unquote(url.path))
        assert target.is_file() and target.parent == run_dir.resolve(), a
    assert "locust_stats.csv" in {a["data-file"] for a in dom.links}

    # Provenance and the command line, as summary.json records them.
    prov = dom.cells("provenance")
    assert prov["commit"][1] == summary["commit"] and prov["command"][1] == summary["command"]
    assert "--label" in prov["command"][1]


def test_a_screenshot_of_the_report_is_not_blank(run_dir: Path, tmp_path: Path):
    shot = tmp_path / "shot.png"
    p = browse(run_dir / "report.html", tmp_path, f"--screenshot={shot}", "--window-size=1200,2000")
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05  # text, tables and plots, not an empty page


def test_report_rebuilds_a_sweep_folder_and_links_its_points(run_dir: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    shutil.copytree(run_dir, sweep / "rate-1")
    (sweep / "rate-1" / "report.html").unlink()
    rows = [{"policy": None, "rate": 1.0, "requests": 5, "errors": 0, "ttft_p50": 0.0125,
             "ttft_p99": 0.0171, "tbt_p99": 0.0042, "qoe_mean": 0.99, "slo_attainment": 0.8,
             "goodput": 0.0833, "server_cost": 2.4e-05, "budget_used": None}]  # fmt: skip
    (sweep / "sweep.json").write_text(json.dumps({
        "kind": "rate", "x": "rate", "rows": rows,
        "points": [{"policy": None, "rate": 1.0, "path": "rate-1", "ok_per_s": 4.9}],
        "slo": {"ttft_s": 0.5}, "units": "rate: requests/s", "commit": "abc1234",
        "command": "disco load --rates 1 --out sweep",
    }))  # fmt: skip
    assert cli.main(["load", "--report", str(sweep)]) == 0
    assert (sweep / "rate-1" / "report.html").is_file()
    dom = dump_dom(sweep / "report.html", tmp_path)
    cells = dom.cells("sweep-rows")
    for key, value in rows[0].items():
        attrs, text = cells[key]
        assert json.loads(attrs["data-value"]) == value and text == cell_text(key, value), key
    assert cells["ttft_p99"][1] == "17" and cells["slo_attainment"][1] == "80.0 %"
    sub = [a for a in dom.links if a.get("data-kind") == "report"]
    assert [a["href"] for a in sub] == ["rate-1/report.html"]
    assert Path(unquote(urlsplit(sub[0]["data-resolved"]).path)).is_file()
    locust = [a["href"] for a in dom.links if a.get("data-kind") == "locust"]
    assert locust == ["rate-1/locust.html"]
    assert dom.cells("provenance")["commit"][1] == "abc1234"
    assert dom.cells("config")["slo"][1]  # the sweep's SLO under its configuration


def test_a_demo_folder_gets_its_policy_tables_config_and_policy_pages(tmp_path: Path):
    """disco demo's summary (rows, sim_rows, config, provenance) and its per-policy folders, as
    the page's HTML has them (no browser needed: the parser reads the file)."""
    rows = [{"policy": "disco", "migration": True, "budget": 0.3, "requests": 150, "errors": 0,
             "ttft_mean": 0.41, "ttft_p50": 0.2, "ttft_p99": 2.5, "tbt_p99": 0.09,
             "qoe_mean": 0.97, "server_cost": 1.2e-4, "device_energy_j": 35.5,
             "budget_used": 0.29, "migrations": 7},
            {"policy": "random", "migration": True, "budget": 0.3, "requests": 150, "errors": 2,
             "ttft_mean": 0.8, "ttft_p50": 0.5, "ttft_p99": 4.0, "tbt_p99": 0.1,
             "qoe_mean": 0.9, "server_cost": 1.0e-4, "device_energy_j": 40.0,
             "budget_used": 0.31, "migrations": 0}]  # fmt: skip
    demo = {"rows": rows, "sim_rows": [{"policy": "disco", "ttft_mean": 0.4, "budget_used": 0.3}],
            "config": {"policies": ["disco", "random"], "budget": 0.3, "size": {"rate": 3.6}},
            "device_side": {"disco": {"ledger": {"requests": 150}}},
            "date": "2026-12-01 10:00 UTC", "commit": "abc1234", "machine": "x86_64, 2 cores",
            "seed": 0, "command": "disco demo --quick"}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(demo))
    (tmp_path / "disco").mkdir()
    (tmp_path / "disco" / "summary.json").write_text(json.dumps({"label": "disco", "requests": 1}))
    (tmp_path / "disco" / "locust.html").write_text("<html></html>")
    paths = cli_reports(tmp_path)
    assert paths == [tmp_path / "disco" / "report.html", tmp_path / "report.html"]
    dom = Dom()
    dom.feed((tmp_path / "report.html").read_text())
    table = dom.tables["demo-rows"]
    assert len(table) == 3  # header + one row per policy
    for row, want in zip(table[1:], rows, strict=True):
        for attrs, text in row:
            assert json.loads(attrs["data-value"]) == want[attrs["data-key"]]
            assert text == cell_text(attrs["data-key"], want[attrs["data-key"]])
    assert [t for _, t in table[1]][:2] == ["disco", "yes"]
    assert table[1][7][1] == "2500"  # ttft_p99 in ms, as the CLI's table shows it
    assert "demo-sim-rows" in dom.tables
    cfg = dom.cells("config")
    assert cfg["policies"][1] == "disco, random" and cfg["budget"][1] == "0.3"
    assert dom.cells("provenance")["command"][1] == "disco demo --quick"
    kinds = {a["data-kind"]: a["href"] for a in dom.links}
    assert kinds["report"] == "disco/report.html" and kinds["locust"] == "disco/locust.html"


def cli_reports(path: Path) -> list[Path]:
    from disco.cluster.commands.report_hook import write

    return write(path)


def test_report_of_a_folder_without_a_run_is_refused(tmp_path: Path, capsys):
    assert cli.main(["load", "--report", str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err
    assert cli.main(["load", "--target", "http://127.0.0.1:9"]) == 2  # no --out, no --report
    assert "--out is required" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        write_report(tmp_path)
