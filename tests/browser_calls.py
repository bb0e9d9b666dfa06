"""Place real browser calls: `sub300 serve` + headless Debian Chromium (Playwright).

Run it inside a loopback-only network namespace, where Chromium and aioice
can meet on 127.0.0.1 (see tests/test_browser.py, which does that):

    unshare -n sh -c 'ip link set lo up && exec python tests/browser_calls.py \
        --out DIR --phase france=q1.wav --phase a=q2.wav,b=q3.wav,c=q4.wav'

Each phase's callers call at the same time, one Chromium per caller (the
fake microphone is a per-browser flag), each playing its WAV once.  For
each caller it waits for one answered turn and the page's own mouth-to-ear
figure, reads the page state, saves a screenshot, hangs up.  Everything it
saw goes to DIR/results.json; the server's log to DIR/server.log.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required",
]


def start_server(port: int, log_path: Path, settings: list[str] = ()) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
    env.update(setting.split("=", 1) for setting in settings)
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "sub300.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parent.parent)


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def wait_healthy(base: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            get(base + "/healthz", 1.0)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("server did not become healthy")


STATE_JS = "() => JSON.parse(JSON.stringify(window.sub300))"
DOM_JS = """() => ({
  transcript: document.querySelector('#transcript').innerText,
  finals: [...document.querySelectorAll('.msg.caller.final')].map(e => e.innerText),
  ledgerRows: [...document.querySelectorAll('.row[data-turn]')].map(r => ({
      v2v: r.querySelector('.v2v').innerText, m2e: r.querySelector('.m2e-val').innerText,
      est: r.querySelector('.m2e-est')?.innerText ?? '',
      segments: r.querySelectorAll('.seg').length, queues: r.querySelector('.queues')?.innerText ?? '' })),
  v2vCard: document.querySelector('#v2v-last').innerText,
  m2eCard: document.querySelector('#m2e-last').innerText,
  status: document.querySelector('#status').innerText,
})"""

async def one_caller(pw, base: str, name: str, wav: str, out: Path, timeout: float, query: str = "") -> dict:
    result: dict = {"name": name, "wav": wav}
    browser = await pw.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={wav}%noloop"])
    try:
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("console", lambda m: result.setdefault("console", []).append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: result.setdefault("page_errors", []).append(str(e)))
        t0 = time.monotonic()
        await page.goto(base + "/?aec=0" + (f"&{query}" if query else ""))
        await page.wait_for_function("() => window.sub300 && window.sub300.ready", timeout=15_000)
        await page.click("#call")
        await page.wait_for_function("() => window.sub300.connectedAt !== null || window.sub300.error",
                                     timeout=30_000)
        result["connect_s"] = round(time.monotonic() - t0, 2)
        try:
            await page.wait_for_function(
                "() => window.sub300.error || (window.sub300.turns.length >= 1 && window.sub300.onsets.length >= 1)",
                timeout=timeout * 1000)
            try:   # the server's turn_heard follows the page's ear report (media/webrtc/ear_report.py)
                await page.wait_for_function("() => window.sub300.heard.length >= 1", timeout=5_000)
            except Exception as exc:
                result["no_turn_heard"] = f"{type(exc).__name__}: {exc}"
        finally:
            await asyncio.sleep(1.2)   # one more stats poll, and the latency panel settles
            result["state"] = await page.evaluate(STATE_JS)
            result["dom"] = await page.evaluate(DOM_JS)
            await page.screenshot(path=str(out / f"{name}.png"), full_page=True)
        await page.click("#call")      # hang up
        await page.wait_for_function("() => window.sub300.phase === 'idle'", timeout=5_000)
        result["hung_up"] = True
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await browser.close()
    return result


async def run(args) -> dict:
    from playwright.async_api import async_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{args.port}"
    results: dict = {"phases": []}
    server = start_server(args.port, out / "server.log", args.server_env)
    try:
        t0 = time.monotonic()
        wait_healthy(base, server, 90)
        results["server_start_s"] = round(time.monotonic() - t0, 2)
        async with async_playwright() as pw:
            for phase in args.phase:
                callers = [c.split("=", 1) for c in phase.split(",")]
                t0 = time.monotonic()
                done = await asyncio.gather(*(one_caller(pw, base, n, w, out, args.timeout, args.query)
                                              for n, w in callers))
                results["phases"].append({"callers": done, "seconds": round(time.monotonic() - t0, 1)})
        # every call should be gone once the pages hung up
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            health = json.loads(get(base + "/healthz"))
            if not health["calls"]:
                break
            await asyncio.sleep(0.2)
        results["calls_after"] = health["calls"]
        results["metrics"] = get(base + "/metrics").decode()
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            results["server_exit"] = server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            results["server_exit"] = "killed"
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for each caller's answer")
    parser.add_argument("--server-env", action="append", default=[], help="SUB300_KEY=VALUE for the server")
    parser.add_argument("--query", default="", help="more query parameters for the page, e.g. jbt=0")
    parser.add_argument("--phase", action="append", required=True,
                        help="NAME=WAV[,NAME=WAV…]: callers that call together")
    results = asyncio.run(run(parser.parse_args()))
    return 1 if results.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
