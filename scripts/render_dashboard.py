#!/usr/bin/env python3
"""Render the Grafana dashboard (scripts/grafana/sub300.json) from real data with matplotlib — not Grafana.

Grafana cannot be installed here, so this draws the same panels: every
panel's PromQL targets, evaluated by a real Prometheus over its HTTP API
(``/api/v1/query_range``), one subplot per panel in the dashboard's grid
order, with the panel's unit and stacking.  ``$__rate_interval`` becomes
``--rate-window``.

What it runs (every process started here is stopped here, by its PID):

1. ``sub300 serve`` on 127.0.0.1 (``--port``; records off, so no database
   is written; the rest is the default configuration and the bundled models);
2. Prometheus (Debian's ``/usr/bin/prometheus``) with a temporary
   configuration scraping that server's ``/metrics`` every second and a
   temporary storage folder, on 127.0.0.1 (``--prom-port``);
3. load: ``scripts/bench_load.py --transport webrtc --url …`` (real aiortc
   callers asking the benchmark's spoken questions; ``--calls``,
   ``--duration-s``), then a quiet tail so the rates fall back;
4. the panels over the whole run, into ``--out`` (PNG, kept small).

    flock /tmp/bench.lock .venv/bin/python scripts/render_dashboard.py --calls 1,2 --duration-s 40

``--prometheus URL --start T --end T`` skips 1-3 and draws from an existing
Prometheus.  Exit status 0, or 1 with the reason on stderr (a process that
did not start, Prometheus that never scraped the server).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "scripts" / "grafana" / "sub300.json"
PROMETHEUS = "/usr/bin/prometheus"


def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until(check, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def stop(process: subprocess.Popen | None, name: str) -> None:
    """SIGTERM by PID, then SIGKILL after 30 s (the server drains its calls first)."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        print(f"{name} (pid {process.pid}) did not stop on SIGTERM: killed", file=sys.stderr)
        process.kill()
        process.wait(5)


def ready(url: str) -> bool:
    """The server answers 200 on /readyz (engines warmed, listeners bound)."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    doc = get_json(f"{prometheus}/api/v1/query_range?{query}")
    if doc.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {doc}")
    return doc["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def render(prometheus: str, start: float, end: float, out: Path, *, rate_window: str, step: float,
           note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 2.6 * rows), sharex=True)
    for ax, panel in zip(axes.flat, panels, strict=False):
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        stacked = panel["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode") == "normal"
        series: list[tuple[str, list[float], list[float]]] = []
        right: list[tuple[str, list[float], list[float]]] = []   # series a field override puts on the right axis
        on_right = {o["matcher"]["options"] for o in panel["fieldConfig"].get("overrides", [])
                    if any(p["id"] == "custom.axisPlacement" and p["value"] == "right" for p in o["properties"])}
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_window)
            for result in query_range(prometheus, expr, start, end, step):
                xs = [(float(t) - start) / 60.0 for t, _ in result["values"]]
                ys = [float(v) for _, v in result["values"]]
                name = legend(target.get("legendFormat", ""), result["metric"])
                if name in on_right:
                    right.append((name, xs, ys))
                    continue
                if unit == "s":
                    ys = [y * 1000.0 for y in ys]
                elif unit == "percentunit":
                    ys = [y * 100.0 for y in ys]
                series.append((name, xs, ys))
        if stacked and series:
            grid = sorted({x for _, xs, _ in series for x in xs})
            values = [[dict(zip(xs, ys, strict=True)).get(x, 0.0) for x in grid] for _, xs, ys in series]
            values = [[0.0 if math.isnan(v) else v for v in row] for row in values]
            ax.stackplot(grid, values, labels=[name for name, _, _ in series], alpha=0.7)
        else:
            for name, xs, ys in series:
                ax.plot(xs, ys, label=name, linewidth=1.2)
        if right:
            twin = ax.twinx()
            for name, xs, ys in right:
                twin.plot(xs, ys, label=name, linewidth=1.2, color="tab:red", linestyle="--")
            twin.set_ylim(bottom=0)
            twin.tick_params(labelsize=7)
            twin.legend(fontsize=6, loc="upper right", framealpha=0.6)
        if not series and not right:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        if unit == "percentunit":
            ax.set_ylim(0, 105)
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.set_ylabel({"s": "ms", "percentunit": "%"}.get(unit, ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("minutes", fontsize=8)
    fig.suptitle(f"{dashboard['title']} — matplotlib rendering of scripts/grafana/sub300.json, not Grafana "
                 f"(Prometheus query_range, rate window {rate_window}, step {step:g} s)\n{note}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72, format="png")
    plt.close(fig)
    print(f"wrote {out} ({out.stat().st_size // 1024} kB)")


def run(args) -> int:
    if not Path(PROMETHEUS).exists():
        print(f"{PROMETHEUS} is missing (Debian package prometheus)", file=sys.stderr)
        return 1
    url = f"http://127.0.0.1:{args.port}"
    prometheus_url = f"http://127.0.0.1:{args.prom_port}"
    work = Path(tempfile.mkdtemp(prefix="sub300-dashboard-"))
    server = prom = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
        env.update(SUB300_RECORDS_ENABLED="false", SUB300_WEBRTC_MAX_CALLS=str(max(args.calls_list) + 1))
        server_log = open(work / "server.log", "w")  # noqa: SIM115 (closed in finally)
        server = subprocess.Popen([sys.executable, "-m", "sub300.cli", "serve", "--host", "127.0.0.1",
                                   "--port", str(args.port)], cwd=ROOT, env=env, stdout=server_log,
                                  stderr=subprocess.STDOUT)
        print(f"sub300 serve: pid {server.pid}, {url}")
        (work / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: sub300\n    static_configs:\n      - targets: ['127.0.0.1:{args.port}']\n")
        prom_log = open(work / "prometheus.log", "w")  # noqa: SIM115 (closed in finally)
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{args.prom_port}"],
                                stdout=prom_log, stderr=subprocess.STDOUT)
        print(f"prometheus: pid {prom.pid}, {prometheus_url}")
        def up() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"sub300 serve exited {server.returncode}")
            return ready(url)

        wait_until(up, args.start_timeout_s, "sub300 serve ready")
        def scraped() -> bool:
            targets = get_json(f"{prometheus_url}/api/v1/targets", 2)["data"]["activeTargets"]
            return any(t["health"] == "up" for t in targets)

        wait_until(scraped, 60, "Prometheus scraping the server")
        start = time.time()
        time.sleep(args.quiet_s)
        load = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--transport", "webrtc",
                               "--url", url, "--calls", args.calls, "--duration-s", str(args.duration_s)],
                              cwd=ROOT, timeout=args.duration_s * 10 + 600)
        if load.returncode != 0:
            print(f"bench_load exited {load.returncode}", file=sys.stderr)
        time.sleep(args.quiet_s)
        end = time.time()
        render(prometheus_url, start, end, args.out, rate_window=args.rate_window, step=args.step,
               note=f"real data: sub300 serve on this machine, scripts/bench_load.py --transport webrtc "
                    f"--calls {args.calls} --duration-s {args.duration_s:g} (aiortc callers), scraped every 1 s")
        return 0
    except (TimeoutError, OSError, RuntimeError, subprocess.SubprocessError) as error:
        print(f"render_dashboard: {error}; logs in {work}", file=sys.stderr)
        for name in ("server.log", "prometheus.log"):
            path = work / name
            if path.exists():
                print(f"--- {name} (tail)\n" + "".join(path.read_text().splitlines(True)[-20:]), file=sys.stderr)
        return 1
    finally:
        stop(server, "sub300 serve")
        stop(prom, "prometheus")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "grafana" / "dashboard.png")
    parser.add_argument("--port", type=int, default=8331, help="sub300 serve's port (127.0.0.1)")
    parser.add_argument("--prom-port", type=int, default=9391, help="Prometheus' port (127.0.0.1)")
    parser.add_argument("--calls", default="1,2", help="bench_load --calls")
    parser.add_argument("--duration-s", type=float, default=40.0, help="bench_load --duration-s (per N)")
    parser.add_argument("--quiet-s", type=float, default=10.0, help="idle time before and after the load")
    parser.add_argument("--rate-window", default="30s", help="what $__rate_interval becomes")
    parser.add_argument("--step", type=float, default=2.0, help="query_range step (s)")
    parser.add_argument("--start-timeout-s", type=float, default=300.0, help="engines' load and warm-up")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, TSDB)")
    parser.add_argument("--prometheus", help="draw from this Prometheus instead (needs --start, --end)")
    parser.add_argument("--start", type=float, help="epoch seconds (with --prometheus)")
    parser.add_argument("--end", type=float, help="epoch seconds (with --prometheus)")
    args = parser.parse_args()
    args.calls_list = [int(n) for n in args.calls.split(",")]
    if args.prometheus:
        if args.start is None or args.end is None:
            parser.error("--prometheus needs --start and --end")
        render(args.prometheus, args.start, args.end, args.out, rate_window=args.rate_window, step=args.step,
               note=f"real data from {args.prometheus}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
