"""`python -m pipeline report` (report.html): the key figures and the four charts (the metrics: tests/actors/test_metrics.py)."""
from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, run_cli
from pipeline.report import rates, steps
from actors.row_schemas import OUTPUT_SCHEMA

TIMELINE = [  # cumulative, as pipeline/job.py samples it: 100, 200, then 300 tokens/s; 5, 10, 10 rows/s
    {"t": 2.0, "rows": 10, "errors": 0, "output_tokens": 200, "drafted": 160, "accepted": 100},
    {"t": 4.0, "rows": 30, "errors": 2, "output_tokens": 600, "drafted": 480, "accepted": 300},
    {"t": 5.0, "rows": 40, "errors": 3, "output_tokens": 900, "drafted": 720, "accepted": 450},
]
POOLS = {"policy": "auto", "plan": {"mode": "disaggregated", "targets": 2, "drafters": 3, "k": 4}, "failovers": 0,
         "actors_over_time": [
             {"t": 5.0, "targets": 1, "drafters": 1, "drafters_per_target": 1.0, "queue": 3, "k": 4, "mode": "disaggregated"},
             {"t": 10.0, "targets": 2, "drafters": 3, "drafters_per_target": 1.5, "queue": 1, "k": 4, "mode": "disaggregated"},
             {"t": 15.0, "targets": 2, "drafters": 3, "drafters_per_target": 1.5, "queue": 0, "k": 4, "mode": "disaggregated"},
         ]}
# (drafted, accepted) per output row: acceptance 5%, 55%, 55%, 100% x3; two rows without drafts (not plotted)
ROWS = [(20, 1), (20, 11), (20, 11), (8, 8), (8, 8), (8, 8), (0, 0), (0, 0)]


def job_metrics(**changes) -> dict:
    m = {"rows": 40, "errors": 3, "errors_by_reason": {"bad image": 2, "OutOfMemoryError": 1},
         "output_tokens": 900, "drafted_tokens": 720, "accepted_tokens": 450, "acceptance_rate": 0.625,
         "wall_s": 12.5, "tokens_per_s": 72.0, "timeline": TIMELINE, "pools": POOLS,
         "compression": {"weights": "int4", "group_size": 64, "apply_to": "target",
                         "visual_tokens": {"keep": 0.5, "method": "attention", "merge": False},
                         "self_speculation": None, "evaluation": None},
         "shards_written": ["shard-00000", "shard-00001"], "shards_skipped": ["shard-00002"], "rows_in_output": 8,
         "config_hash": "abc123def4567890", "finished_at": "2026-11-22T20:00:00Z"}
    return {**m, **changes}


def output_dir(path, metrics_: dict):
    path.mkdir()
    (path / "metrics.json").write_text(json.dumps(metrics_))
    rows = [{"key": f"k{i}", "shard": "shard-00000", "text": "a cat", "finish_reason": "stop", "num_prompt_tokens": 9,
             "num_output_tokens": 5, "num_drafted_tokens": d, "num_accepted_tokens": a, "error": None}
            for i, (d, a) in enumerate(ROWS)]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), path / "part-shard-00000.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=OUTPUT_SCHEMA), path / "part-shard-00001.parquet")  # empty shard
    return path


def charts(page: str) -> dict[str, str]:
    return dict(re.findall(r'<svg id="(\w+)"(.*?)</svg>', page, re.S))


# report.py gives the artists that carry data gids, which the SVG keeps as <g id="<chart>-<gid>">

def texts(svg: str, gid: str) -> list[str]:
    """The texts drawn by the artists whose gid starts with gid, in order."""
    return re.findall(rf'<g id="\w+-{gid}[^"]*">(?:<title>[^<]*</title>)?\s*<text[^>]*>([^<]*)</text>', svg)


def ticks(svg: str, axis: str) -> list[str]:
    """The tick labels of all x or y axes of a chart."""
    return re.findall(rf'<g id="\w+-{axis}tick_\d+">.*?<text[^>]*>([^<]*)</text>', svg, re.S)


def points(svg: str, gid: str) -> list[tuple[float, float]]:
    """The vertices of the path drawn for gid (the chart's SVG coordinates: y grows downwards)."""
    d = re.search(rf'<g id="{gid}">(?:<title>[^<]*</title>)?\s*<path d="([^"]*)"', svg).group(1)
    return [(float(x), float(y)) for x, y in re.findall(r"[ML] ([-\d.]+) ([-\d.]+)", d)]


def size(svg: str, gid: str) -> tuple[float, float]:
    """Width and height of what was drawn for gid (a bar)."""
    xs, ys = zip(*points(svg, gid))
    return max(xs) - min(xs), max(ys) - min(ys)


def drawn_as(drawn: list[tuple[float, float]], data: list[tuple[float, float]]) -> bool:
    """Whether the drawn points are the data points scaled and shifted, x to the right and y upwards."""
    if len(drawn) != len(data):
        return False
    for coords, values, sign in zip(np.array(drawn).T, np.array(data, float).T, (1, -1)):
        slope, offset = np.polyfit(values, coords, 1)
        if sign * slope <= 0 or not np.allclose(slope * values + offset, coords, atol=0.01):
            return False
    return True


def test_rates_and_steps():
    assert rates(TIMELINE, "output_tokens") == [(0.0, 100.0), (2.0, 100.0), (2.0, 200.0), (4.0, 200.0),
                                                (4.0, 300.0), (5.0, 300.0)]
    assert rates(TIMELINE, "rows")[::2] == [(0.0, 5.0), (2.0, 10.0), (4.0, 10.0)]
    assert rates(TIMELINE[:1], "rows") == [(0.0, 5.0), (2.0, 5.0)]  # from the job's start
    assert rates(TIMELINE, "output_tokens", window_s=3) == [(0.0, 150.0), (4.0, 150.0), (4.0, 300.0), (5.0, 300.0)]
    assert steps(POOLS["actors_over_time"], "drafters_per_target") == [(5.0, 1.0), (10.0, 1.0), (10.0, 1.5),
                                                                       (15.0, 1.5), (15.0, 1.5)]


def test_report_html(tmp_path):
    out = output_dir(tmp_path / "out", job_metrics())
    r = run_cli("report", str(out))
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()
    assert f"wrote {out}/report.html" in r.stdout
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert page.count("<svg") == 4
    svgs = charts(page)
    assert list(svgs) == ["throughput", "acceptance", "pools", "errors"]
    ids = re.findall(r'\bid="([^"]*)"', page)
    assert len(ids) == len(set(ids))  # four figures in one page
    for svg in svgs.values():  # clip paths and markers: each chart's own
        refs = re.findall(r'(?:href="#|url\(#)([^")]*)', svg)
        assert refs and set(refs) <= set(re.findall(r'\bid="([^"]*)"', svg))
    for chart, title, x_label, y_labels in [
            ("throughput", "Throughput over time", "time since the job started (s)", ["output tokens/s", "rows/s"]),
            ("acceptance", "Acceptance per row", "accepted / drafted tokens of a row", ["rows"]),
            ("pools", "Drafters per target over time", "time since the pools started (s)",
             ["drafters per target", "ready actors"]),
            ("errors", "Error rows by reason", "error rows", [])]:
        assert f">{title}</text>" in svgs[chart]  # texts are SVG text, not glyph paths
        assert (texts(svgs[chart], "title"), texts(svgs[chart], "xlabel")) == ([title], [x_label])
        assert texts(svgs[chart], "ylabel-") == y_labels

    # header: the key figures and settings
    for figure in (">40<", ">3 (7.5%)<", ">900<", ">72.0<", ">12.5 s<", ">62.5%<", ">2 / 1<", ">abc123def4567890<",
                   "int4 (group size 64), applied to target", "keep 50% (attention)"):
        assert figure in page, figure

    # throughput: tokens/s in one panel, rows/s and error rows/s in the other; 6 points each (3 intervals)
    thr = svgs["throughput"]
    assert re.findall(r'<g id="throughput-series-[\w-]+"><title>([^<]*)', thr) == ["tokens/s", "rows/s", "error rows/s"]
    assert texts(thr, "legend-") == ["tokens/s", "rows/s", "error rows/s"]
    for gid, data in [("tokens-s", [(0, 100), (2, 100), (2, 200), (4, 200), (4, 300), (5, 300)]),
                      ("rows-s", [(0, 5), (2, 5), (2, 10), (4, 10), (4, 10), (5, 10)]),
                      ("error-rows-s", [(0, 0), (2, 0), (2, 1), (4, 1), (4, 1), (5, 1)])]:
        assert drawn_as(points(thr, f"throughput-series-{gid}"), data), gid
    assert "300" in ticks(thr, "y") and "0" in ticks(thr, "y") and "5" in ticks(thr, "x")
    # the panels share the time axis: the lines of both end at the same x
    assert points(thr, "throughput-series-tokens-s")[-1][0] == points(thr, "throughput-series-rows-s")[-1][0]

    # acceptance: a bar per bin, from left to right; the counts of the 6 rows with drafts; the job's rate marked
    acc = svgs["acceptance"]
    bars = [f"acceptance-bar-{i}" for i in range(10)]
    assert len(re.findall(r'<g id="acceptance-bar-\d+">', acc)) == 10
    lefts = [min(x for x, _ in points(acc, bar)) for bar in bars]
    assert lefts == sorted(lefts) and len(set(lefts)) == 10
    heights = np.array([size(acc, bar)[1] for bar in bars])
    assert np.allclose(heights / heights[9] * 3, [1, 0, 0, 0, 0, 2, 0, 0, 0, 3])
    assert texts(acc, "count-") == ["1", "2", "3"]  # bins 0-10%, 50-60%, 90-100%
    assert re.findall(r'<g id="acceptance-count-(\d+)">', acc) == ["0", "5", "9"]
    assert re.findall(r"<title>(\d+)% to \d+%: (\d+) rows</title>", acc)[5] == ("50", "2")
    assert ticks(acc, "x") == [f"{p}%" for p in range(0, 101, 10)]
    assert texts(acc, "marker-label") == ["this run overall: 62.5%"]
    marker_x = {x for x, _ in points(acc, "acceptance-marker")}
    left, width = min(x for x, _ in points(acc, bars[6])), size(acc, bars[6])[0]
    assert len(marker_x) == 1 and marker_x.pop() == pytest.approx(left + 0.25 * width, abs=0.01)  # at 62.5%
    assert "6 output rows with drafted tokens" in page

    # drafters per target: the ratio, and the actor counts (drafters dashed)
    pools = svgs["pools"]
    assert re.findall(r'<g id="pools-series-[\w-]+"><title>([^<]*)', pools) == ["drafters/target", "targets",
                                                                                 "drafters"]
    assert texts(pools, "legend-") == ["drafters/target", "targets", "drafters"]
    assert drawn_as(points(pools, "pools-series-drafters-target"), [(5, 1), (10, 1), (10, 1.5), (15, 1.5), (15, 1.5)])
    assert drawn_as(points(pools, "pools-series-targets"), [(5, 1), (10, 1), (10, 2), (15, 2), (15, 2)])
    assert drawn_as(points(pools, "pools-series-drafters"), [(5, 1), (10, 1), (10, 3), (15, 3), (15, 3)])
    assert re.search(r'<g id="pools-series-drafters"><title>[^<]*</title>\s*<path [^>]*stroke-dasharray', pools)
    assert "1.5" in ticks(pools, "y") and "final plan 2 targets, 3 drafters, k=4" in page

    # errors: one bar per reason, most frequent first (on top), with its count
    err = svgs["errors"]
    assert len(re.findall(r'<g id="errors-bar-\d+">', err)) == 2
    assert texts(err, "label-") == ["bad image", "OutOfMemoryError"]
    assert texts(err, "count-") == ["2", "1"]
    (w0, _), (w1, _) = size(err, "errors-bar-0"), size(err, "errors-bar-1")
    assert w0 == pytest.approx(2 * w1, abs=0.01)
    assert points(err, "errors-bar-0")[0][1] < points(err, "errors-bar-1")[0][1]
    assert "<title>bad image: 2 rows</title>" in err


def test_report_is_deterministic_and_matplotlib_is_imported_lazily(tmp_path):
    import subprocess
    import sys

    from pipeline.report import write_report

    out = output_dir(tmp_path / "out", job_metrics())
    write_report(str(out))
    first = (out / "report.html").read_text()
    write_report(str(out))
    assert (out / "report.html").read_text() == first
    code = "import sys, pipeline, pipeline.report; print('matplotlib' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-3000:]


def test_report_of_a_colocated_job_without_errors(tmp_path):
    out = output_dir(tmp_path / "out", job_metrics(pools=None, errors=0, errors_by_reason={}))
    dest = tmp_path / "elsewhere.html"
    r = run_cli("report", str(out), "--out", str(dest))
    assert r.returncode == 0, r.stderr
    assert not (out / "report.html").exists()
    page = dest.read_text()
    assert "co-located job: one drafter per target actor" in page and "no errors" in page
    assert list(charts(page)) == ["throughput", "acceptance"]


def test_report_of_an_s3_output_dir(tmp_path):
    """Read and written through fsspec: an s3:// output directory (a local S3 server) gets its report.html."""
    import os
    import socket
    import subprocess
    import sys

    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
    try:
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, key="testing", secret="testing")
        fs.mkdir("specray-report")
        fs.put(str(output_dir(tmp_path / "out", job_metrics())) + "/", "specray-report/out/", recursive=True)
        r = subprocess.run([sys.executable, "-m", "pipeline", "report", "s3://specray-report/out"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        page = fs.cat("specray-report/out/report.html").decode()
        assert list(charts(page)) == ["throughput", "acceptance", "pools", "errors"]
        assert texts(charts(page)["acceptance"], "count-") == ["1", "2", "3"]  # the part files were read from S3
    finally:
        server.stop()


def test_report_usage_errors(tmp_path):
    r = run_cli("report", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"usage error: no such output directory: {tmp_path / 'missing'}"]
    (tmp_path / "unfinished").mkdir()
    r = run_cli("report", str(tmp_path / "unfinished"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "has no metrics.json" in r.stderr


def test_report_of_a_job_whose_drafter_learned(tmp_path):
    """Acceptance over time (windowed accepted / drafted) and the newest drafter version, with the trainer's record."""
    accepted = (100, 380, 450)  # windows: 100/160, 280/320, 70/240 accepted
    timeline = [dict(p, drafter_version=v, accepted=a) for p, v, a in zip(TIMELINE, (0, 1, 3), accepted)]
    learned = {"by_version": [{"version": 0, "rows": 10, "drafted": 160, "accepted": 100, "acceptance": 0.625},
                              {"version": 3, "rows": 30, "drafted": 560, "accepted": 350, "acceptance": 0.625}],
               "trainer": {"steps": 30, "versions": [{"version": v} for v in (1, 2, 3)], "events": ["trainer lost"],
                           "saved_to": "/data/out/drafter"}}
    out = output_dir(tmp_path / "out", job_metrics(timeline=timeline, drafter_training=learned))
    assert run_cli("report", str(out)).returncode == 0
    page = (out / "report.html").read_text()
    svgs = charts(page)
    assert list(svgs) == ["throughput", "acceptance", "learning", "pools", "errors"]
    assert "30 steps, 3 versions published, saved to /data/out/drafter; events: trainer lost" in page
    assert "v0: 62.5% over 10 rows" in page
    assert drawn_as(points(svgs["learning"], "learning-series-newest-version-in-the-output"),
                    [(2, 0), (4, 0), (4, 1), (5, 1), (5, 3)])
    assert drawn_as(points(svgs["learning"], "learning-series-accepted-drafted"),
                    [(0, 0.625), (2, 0.625), (2, 0.875), (4, 0.875), (4, 70 / 240), (5, 70 / 240)])


def test_acceptance_over_time_is_windowed_accepted_over_drafted():
    from pipeline.report import acceptance_over_time

    assert acceptance_over_time(TIMELINE, 0.0) == [(0.0, 0.625), (2.0, 0.625), (2.0, 0.625), (4.0, 0.625),
                                                   (4.0, 0.625), (5.0, 0.625)]
    line = [{"t": 1.0, "drafted": 10, "accepted": 2}, {"t": 2.0, "drafted": 20, "accepted": 11}]
    assert acceptance_over_time(line, 0.0) == [(0.0, 0.2), (1.0, 0.2), (1.0, 0.9), (2.0, 0.9)]
