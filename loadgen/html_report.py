"""One self-contained HTML page per run folder: ``DIR/report.html``, what a person opens.

:func:`write_report` reads whatever a finished run left in its folder and writes one file with no
outside reference but relative links to the run's own files:

- the tables: a ``disco load`` run's summary (the run's numbers, then the endpoint split and cost,
  then every other number ``summary.json`` holds), ``disco demo``'s per-policy rows and the
  simulator's beside them, and a sweep's rows and points when ``sweep.json`` is there. Every
  cell shows the value as the CLI's tables format it, and carries the exact JSON value in its
  ``data-value`` attribute (the raw value is also printed beside each summary number);
- every ``*.png`` of the folder, inline (``data:image/png;base64``), in a stable order;
- the run's configuration and provenance (commit, package versions, machine, seed, command line),
  its notes (units, what each number counts) and anything else recorded, as ``summary.json`` and
  ``sweep.json`` hold them;
- links to Locust's own HTML reports (``locust*.html``, here and one folder down), to the reports
  of the runs in sub-folders (a sweep's points, a demo's policies) and to the folder's other files.

Standard library only (``html.escape``); a ten-line inline script marks each plot that did not
decode (and counts those that did) once the page has loaded; the page reads the same without it.
``write_reports`` writes the reports of a folder's sub-runs first (deepest first), so that every
parent links to its children's pages.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .report import COLUMNS, format_cell

REPORT_NAME = "report.html"
# A summary's keys that say where and how it was made (disco.cluster.provenance), top level or
# under "provenance".
PROVENANCE_KEYS = ("date", "commit", "versions", "machine", "seed", "command")
# disco load's summary, in the order the CLI prints it: the run, then who served and what it cost.
RUN_KEYS = ("label", "mode", "concurrency", "workers", "requests", "ok", "errors", "sent",
            "scheduled", "duration_s", "offered_rate_per_s", "ok_per_s", "output_tokens_per_s",
            "tokens", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tbt_mean_s",
            "tbt_p50_s", "tbt_p99_s", "qoe_mean", "slo_attainment", "goodput_per_s", "slo_met", "send_lag_p50_s",
            "send_lag_p99_s", "send_lag_max_s", "interrupted")  # fmt: skip
SPLIT_KEYS = ("first_from_server", "first_from_device", "first_from_unknown", "tokens_server",
              "tokens_device", "tokens_unknown_source", "handovers", "requests_with_handover",
              "migrations", "failovers", "refused", "server_cost_usd", "device_energy_j",
              "regime", "budget_used")  # fmt: skip
# The measured window (disco.loadgen.phases): what the figures count.
PHASE_KEYS = ("warmup_s", "ramp_s", "cooldown_s", "measured_from_s", "measured_to_s",
              "measured_window_s")  # fmt: skip
# Headers for keys the CLI's tables do not name.
EXTRA_HEADERS = {
    "ok": "ok", "sent": "sent", "scheduled": "scheduled", "mode": "mode", "tokens": "tokens",
    "workers": "Locust workers",
    "output_tokens_per_s": "output tokens/s", "send_lag_p50_s": "send lag P50 ms",
    "send_lag_max_s": "send lag max ms", "interrupted": "interrupted",
    "first_from_unknown": "1st tok untagged", "tokens_unknown_source": "tokens untagged",
    "requests_with_handover": "requests handed over", "refused": "refused (429)",
    "regime": "budget regime", "slo_met": "SLO met (requests)", "warmup_s": "warm-up s",
    "ramp_s": "ramp s", "cooldown_s": "cool-down s", "measured_from_s": "measured from s",
    "measured_to_s": "measured to s", "measured_window_s": "measured window s",
}  # fmt: skip
EXTRA_SCALE = {"send_lag_p50_s": 1000.0, "send_lag_max_s": 1000.0}
PLOT_ORDER = ("sweep.png", "overlay.png", "ttft_cdf.png", "tbt_cdf.png", "replicas.png")
SUBDIR_DEPTH = 3  # how far down write_reports looks for sub-runs

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;
 padding:0 16px;color:#1d1d1f}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#555}
table{border-collapse:collapse;margin:6px 0 12px}td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f4f4f6;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.raw,td.key{font-family:ui-monospace,monospace;font-size:12px;color:#555}
.wide{overflow-x:auto}figure{margin:12px 0;display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:12px}
pre{background:#f7f7f9;padding:8px;overflow-x:auto;font-size:12px}dt{font-weight:600}
dd{margin:0 0 6px 16px}.bad{color:#b00020}
"""
SCRIPT = """
addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute("data-decoded", good ? "yes" : "no");
    if (good) { ok++; }
    else { imgs[i].insertAdjacentHTML("afterend", "<p class=bad>this plot did not decode</p>"); }
  }
  var s = document.getElementById("plots-status");
  if (s) {
    s.textContent = ok + " of " + imgs.length + " plots decoded";
    s.setAttribute("data-decoded", String(ok));
  }
  var links = document.querySelectorAll("a[data-file]");
  for (var j = 0; j < links.length; j++) { links[j].setAttribute("data-resolved", links[j].href); }
});
"""


class ReportError(ValueError):
    """The folder holds nothing a report can be made of."""


# ---- entry points --------------------------------------------------------------------------------


def write_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` from what the folder holds; returns its path. Raises
    :class:`ReportError` for a folder with neither ``summary.json`` nor ``sweep.json``."""
    out = Path(out_dir)
    page = render_report(out)
    path = out / REPORT_NAME
    tmp = path.with_name(f".{REPORT_NAME}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_reports(out_dir: str | Path, depth: int = SUBDIR_DEPTH) -> list[Path]:
    """The report of every run folder under ``out_dir`` (``depth`` levels down, deepest first,
    so that each parent links to its children's pages), then ``out_dir``'s own. A sub-folder
    whose results are unreadable is skipped; ``out_dir``'s own raises :class:`ReportError`."""
    out = Path(out_dir)
    found = [d for d in _subdirs(out, depth) if _is_run(d)]
    found.sort(key=lambda d: (-len(d.relative_to(out).parts), str(d)))
    paths = []
    for d in found:
        try:
            paths.append(write_report(d))
        except ReportError:
            continue
    if _is_run(out):
        paths.append(write_report(out))
    return paths


def render_report(out_dir: str | Path) -> str:
    out = Path(out_dir)
    if not out.is_dir():
        raise ReportError(f"{out} is not a folder")
    summary = _read_json(out / "summary.json")
    sweep = _read_json(out / "sweep.json")
    if summary is None and sweep is None:
        raise ReportError(f"{out} holds no summary.json or sweep.json: not a finished run")
    if not isinstance(summary, dict):
        summary = {} if summary is None else {"value": summary}
    sweep = sweep if isinstance(sweep, dict) or sweep is None else {"rows": sweep}
    title = _title(out, summary, sweep)
    body: list[str] = [f"<h1>{_e(title)}</h1>", _meta_line(out, summary, sweep)]
    used: set[str] = set()  # summary keys shown somewhere above "More recorded data"
    if summary:
        body += _summary_sections(summary, used)
    if sweep is not None:
        body += _sweep_sections(sweep)
    body += _plot_section(out)
    body += _link_sections(out)
    body += _config_sections(summary, sweep, used)
    body += _more_sections(summary, sweep, used)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        *body,
        f"<script>{SCRIPT}</script>", "</body></html>", "",
    ])  # fmt: skip


# ---- what the folder is --------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: unreadable ({e})") from None


def _is_run(d: Path) -> bool:
    return (d / "summary.json").is_file() or (d / "sweep.json").is_file()


def _subdirs(root: Path, depth: int) -> Iterable[Path]:
    if depth <= 0:
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return
    for c in children:
        yield c
        yield from _subdirs(c, depth - 1)


def _title(out: Path, summary: Mapping[str, Any], sweep: Mapping[str, Any] | None) -> str:
    if "rows" in summary:
        return f"disco demo: {out.name}"
    if summary:
        return f"disco load: {summary.get('label') or out.name}"
    assert sweep is not None
    return f"sweep over {sweep.get('kind', 'load')}: {out.name}"


def _meta_line(out: Path, summary: Mapping[str, Any], sweep: Mapping[str, Any] | None) -> str:
    prov = _provenance(summary) or _provenance(sweep or {})
    parts = []
    if prov.get("date"):
        parts.append(f"run {prov['date']}")
    if prov.get("commit"):
        parts.append(f"commit {prov['commit']}")
    if prov.get("machine"):
        parts.append(str(prov["machine"]))
    parts.append(f"folder {out.resolve().name}/")
    parts.append("report written " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    return f'<p class="meta">{_e(" · ".join(parts))}</p>'


def _provenance(d: Mapping[str, Any]) -> dict[str, Any]:
    nested = d.get("provenance")
    if isinstance(nested, Mapping):
        return dict(nested)
    return {k: d[k] for k in PROVENANCE_KEYS if k in d}


# ---- tables --------------------------------------------------------------------------------------


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _header(key: str) -> str:
    if key in COLUMNS:
        return COLUMNS[key][0]
    return EXTRA_HEADERS.get(key, key)


def cell_text(key: str, value: Any) -> str:
    """A value as the report shows it: the CLI's format for the keys its tables know (times in
    ms, ...), else a short generic one."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in COLUMNS:
        return format_cell(key, value)
    if key in EXTRA_SCALE and isinstance(value, int | float):
        return f"{value * EXTRA_SCALE[key]:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:d}"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _raw(value: Any) -> str:
    return json.dumps(value, default=str)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _td(key: str, value: Any) -> str:
    num = isinstance(value, int | float) and not isinstance(value, bool)
    cls = ' class="num"' if num else ""
    return (f'<td{cls} data-key="{_e(key)}" data-value="{_e(_raw(value))}">'
            f"{_e(cell_text(key, value))}</td>")  # fmt: skip


def vertical_table(table_id: str, d: Mapping[str, Any], keys: Sequence[str]) -> str:
    """One row per key: its header, the value as shown, the summary.json key and raw value."""
    rows = [
        f'<tr data-key="{_e(k)}"><th>{_e(_header(k))}</th>{_td(k, d[k])}'
        f'<td class="key">{_e(k)}</td><td class="raw">{_e(_raw(d[k]))}</td></tr>'
        for k in keys
    ]
    head = "<tr><th>what</th><th>value</th><th>key</th><th>exact value</th></tr>"
    return f'<table id="{_e(table_id)}">{head}{"".join(rows)}</table>'


def horizontal_table(table_id: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """One row per record, one column per scalar key (in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and _is_scalar(v)]
    head = "".join(f'<th data-key="{_e(c)}" title="{_e(c)}">{_e(_header(c))}</th>' for c in cols)
    body = "".join("<tr>" + "".join(_td(c, r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f'<div class="wide"><table id="{_e(table_id)}"><tr>{head}</tr>{body}</table></div>'


def _records_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _summary_sections(s: Mapping[str, Any], used: set[str]) -> list[str]:
    out: list[str] = []
    if "rows" in s and _records_list(s["rows"]):  # disco demo
        out += ["<h2>Per policy (live)</h2>", horizontal_table("demo-rows", s["rows"])]
        used.add("rows")
        if _records_list(s.get("sim_rows")):
            out += ["<h2>Simulator on the same schedule</h2>",
                    horizontal_table("demo-sim-rows", s["sim_rows"])]  # fmt: skip
        used.add("sim_rows")
    run = [k for k in RUN_KEYS if k in s and _is_scalar(s[k])]
    split = [k for k in SPLIT_KEYS if k in s and _is_scalar(s[k])]
    window = [k for k in PHASE_KEYS if k in s and _is_scalar(s[k])]
    used.update(("slo", "slo_missed", "phases"))
    shown = set(run) | set(split) | set(window) | set(PROVENANCE_KEYS) | used
    rest = [k for k, v in s.items() if k not in shown and _is_scalar(v)]
    if run:
        out += ["<h2>Summary</h2>", vertical_table("summary-run", s, run)]
    if isinstance(s.get("slo"), Mapping):
        out += ["<h3>SLO (bounds in seconds)</h3>", kv_table("slo", s["slo"])]
        if isinstance(s.get("slo_missed"), Mapping):
            out += ["<h3>Requests that missed each bound</h3>",
                    kv_table("slo-missed", s["slo_missed"])]  # fmt: skip
    if split:
        out += ["<h2>Endpoint split and cost</h2>", vertical_table("summary-split", s, split)]
    if window:
        out += ["<h2>Measured window</h2>", vertical_table("summary-window", s, window)]
        if isinstance(s.get("phases"), Mapping):
            out.append(kv_table("phases", s["phases"]))
    elif isinstance(s.get("phases"), Mapping):
        out += ["<h2>Phases</h2>", kv_table("phases", s["phases"])]
    if rest:
        out += ["<h2>Every other number</h2>", vertical_table("summary-other", s, rest)]
    used.update(run, split, window, rest)
    kinds = s.get("error_kinds")
    if isinstance(kinds, Mapping) and kinds:
        rows = "".join(f"<tr><td>{_e(k)}</td><td class=num>{_e(n)}</td></tr>"
                       for k, n in kinds.items())  # fmt: skip
        head = "<tr><th>error</th><th>requests</th></tr>"
        out += ["<h3>Errors by kind</h3>", f'<table id="error-kinds">{head}{rows}</table>']
    used.add("error_kinds")
    return out


def _sweep_sections(sw: Mapping[str, Any]) -> list[str]:
    out = [f"<h2>Sweep over {_e(sw.get('kind', 'load'))}</h2>"]
    if sw.get("units"):
        out.append(f'<p class="meta">Units: {_e(sw["units"])}</p>')
    if _records_list(sw.get("rows")):
        out.append(horizontal_table("sweep-rows", sw["rows"]))
    if _records_list(sw.get("points")):
        out += ["<h3>Points (each its own run folder)</h3>",
                horizontal_table("sweep-points", sw["points"])]  # fmt: skip
    return out


# ---- plots and links -----------------------------------------------------------------------------


def _plots(out: Path) -> list[Path]:
    pngs = [p for p in out.glob("*.png") if p.is_file()]
    rank = {n: i for i, n in enumerate(PLOT_ORDER)}
    return sorted(pngs, key=lambda p: (rank.get(p.name, len(rank)), p.name))


def _plot_section(out: Path) -> list[str]:
    plots = _plots(out)
    if not plots:
        return []
    figs = []
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        figs.append(f'<figure><img alt="{_e(p.name)}" data-file="{_e(p.name)}" '
                    f'src="data:image/png;base64,{data}">'
                    f"<figcaption>{_e(p.name)}</figcaption></figure>")  # fmt: skip
    status = f'<p class="meta" id="plots-status">{len(plots)} plots</p>'
    return ["<h2>Plots</h2>", status, *figs]


def _href(out: Path, target: Path) -> str:
    return quote(target.relative_to(out).as_posix())


def _link(out: Path, target: Path, text: str | None = None, kind: str = "file") -> str:
    rel = target.relative_to(out).as_posix()
    return (f'<a href="{_e(_href(out, target))}" data-file="{_e(rel)}" data-kind="{_e(kind)}">'
            f"{_e(text or rel)}</a>")  # fmt: skip


def _size(p: Path) -> str:
    n = p.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _link_sections(out: Path) -> list[str]:
    res: list[str] = []
    locust = sorted(out.glob("locust*.html")) + sorted(out.glob("*/locust*.html"))
    if locust:
        items = "".join(f"<li>{_link(out, p, kind='locust')} ({_size(p)})</li>" for p in locust)
        res += ["<h2>Locust's own reports</h2>", f'<ul id="locust-links">{items}</ul>']
    subs = sorted(p for p in out.glob(f"*/{REPORT_NAME}"))
    if subs:
        items = []
        for p in subs:
            label = ""
            sub = _read_json_quiet(p.parent / "summary.json")
            if isinstance(sub, Mapping) and sub.get("label"):
                label = f" ({sub['label']})"
            items.append(f"<li>{_link(out, p, p.parent.name + '/', kind='report')}{_e(label)}</li>")
        res += ["<h2>Runs in sub-folders</h2>", f'<ul id="sub-reports">{"".join(items)}</ul>']
    files = sorted(p for p in out.iterdir() if p.is_file() and p.suffix != ".png"
                   and p.name != REPORT_NAME and not p.name.startswith(".")
                   and not (p.name.startswith("locust") and p.suffix == ".html"))  # fmt: skip
    if files:
        items = "".join(f"<li>{_link(out, p)} ({_size(p)})</li>" for p in files)
        res += ["<h2>Files of this run</h2>", f'<ul id="files">{items}</ul>']
    return res


def _read_json_quiet(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- configuration, provenance, notes, the rest --------------------------------------------------


def kv_table(table_id: str | None, d: Mapping[str, Any]) -> str:
    """Keys and values; nested mappings as nested tables, lists of scalars joined."""
    rows = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            inner = kv_table(None, v) if v else "<i>empty</i>"
            rows.append(f'<tr data-key="{_e(k)}"><th>{_e(k)}</th><td data-key="{_e(k)}">'
                        f"{inner}</td></tr>")  # fmt: skip
        elif isinstance(v, list) and all(_is_scalar(x) for x in v):
            text = ", ".join(cell_text(k, x) for x in v) or "[]"
            rows.append(f'<tr data-key="{_e(k)}"><th>{_e(k)}</th><td data-key="{_e(k)}" '
                        f'data-value="{_e(_raw(v))}">{_e(text)}</td></tr>')  # fmt: skip
        elif isinstance(v, list):
            rows.append(f'<tr data-key="{_e(k)}"><th>{_e(k)}</th><td><pre>'
                        f"{_e(json.dumps(v, indent=1, default=str))}</pre></td></tr>")  # fmt: skip
        else:
            text = v if isinstance(v, str) else _raw(v)
            rows.append(f'<tr data-key="{_e(k)}"><th>{_e(k)}</th><td data-key="{_e(k)}" '
                        f'data-value="{_e(_raw(v))}">{_e(text)}</td></tr>')  # fmt: skip
    attr = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{attr}>{''.join(rows)}</table>"


def _config_sections(
    summary: Mapping[str, Any], sweep: Mapping[str, Any] | None, used: set[str]
) -> list[str]:
    out: list[str] = []
    config = {}
    for src in (summary, sweep or {}):
        for key in ("config", "options", "spec"):
            if isinstance(src.get(key), Mapping):
                config.update(src[key])
    for key in ("config", "options", "spec"):
        used.add(key)
    if sweep is not None and sweep.get("slo") is not None:
        config.setdefault("slo", sweep["slo"])
    out.append("<h2>Configuration</h2>")
    out.append(kv_table("config", config) if config
               else '<p class="meta">summary.json records no configuration block; the command '
               "line below says how the run was made.</p>")  # fmt: skip
    prov = _provenance(summary) or _provenance(sweep or {})
    used.update(PROVENANCE_KEYS)
    used.add("provenance")
    out.append("<h2>Provenance</h2>")
    out.append(kv_table("provenance", prov) if prov
               else '<p class="meta">not recorded in summary.json (a run written before the '
               "results carried their provenance).</p>")  # fmt: skip
    notes: dict[str, Any] = {}
    for src in (summary, sweep or {}):
        if isinstance(src.get("notes"), Mapping):
            notes.update(src["notes"])
    used.add("notes")
    if notes:
        items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in notes.items())
        out += ["<h2>Notes</h2>", f'<dl id="notes">{items}</dl>']
    return out


def _more_sections(
    summary: Mapping[str, Any], sweep: Mapping[str, Any] | None, used: set[str]
) -> list[str]:
    """Whatever summary.json and sweep.json hold that no section above showed."""
    out = []
    for name, src, skip in (("summary.json", summary, used),
                            ("sweep.json", sweep or {}, {"rows", "points", "units", "slo", "notes",
                                                         "config", "provenance",
                                                         *PROVENANCE_KEYS})):  # fmt: skip
        for k, v in src.items():
            if k in skip or (name == "sweep.json" and _is_scalar(v) and k in ("kind", "x")):
                continue
            if _is_scalar(v) and name == "summary.json":
                continue  # every scalar of the summary is in its tables
            body = kv_table(None, v) if isinstance(v, Mapping) and v else (
                f"<pre>{_e(json.dumps(v, indent=1, default=str))}</pre>")  # fmt: skip
            out.append(f'<details data-key="{_e(k)}"><summary>{_e(name)}: '
                       f"<code>{_e(k)}</code></summary>{body}</details>")  # fmt: skip
    return (["<h2>More recorded data</h2>", *out]) if out else []
