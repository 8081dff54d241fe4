"""Server start-up: seconds from `jaxmr serve` to ready, resident memory, and which heavy modules it loaded.

    python -m bench.serve_startup --index runs/index [--repeats 3] [--baseline /tmp/old-checkout]

Starts the real command line (`python -m jaxmr.cli serve`) on a free loopback port, polls `/readyz`, reads the
process's peak resident set (VmHWM) from /proc, and lists the heavy modules (optax, orbax, grain, ...) that
importing the CLI and the server app loads, in a separate `python -c`.
Results go to bench/results/serve_startup-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import write_results

# optax comes with flax.nnx (nnx.Optimizer) whoever imports it; the others only with training code.
HEAVY = ("optax", "orbax", "grain", "tensorboardX", "tensorflow_datasets", "torch", "sklearn", "jaxmr.training",
         "jaxmr.trainer")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start_once(index: str, timeout: float = 300, repo: str | None = None) -> dict:
    """One start: seconds to ready, peak and current RSS (MiB), and the heavy modules the process loaded."""
    port = _free_port()
    env = {**os.environ, "JAXMR_WARM_UP": "true"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jaxmr.cli", "serve", "--index", index, "--port", str(port)],
                            env=env, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            if time.perf_counter() - start > timeout:
                raise RuntimeError("the server did not become ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        ready_s = time.perf_counter() - start
        return {"ready_s": ready_s, "peak_rss_mib": _rss_kib(proc.pid, "VmHWM") / 1024,
                "rss_mib": _rss_kib(proc.pid, "VmRSS") / 1024}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


def loaded_modules(app_module: str, repo: str | None = None) -> list[str]:
    """The heavy modules that importing the CLI and the server app loads (what `jaxmr serve` pays for)."""
    test = "any(k == m or k.startswith(m + '.') for k in sys.modules)"
    code = f"import sys, jaxmr.cli, {app_module}; print(' '.join(m for m in {HEAVY!r} if {test}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    return out.stdout.split()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="serve_startup")
    parser.add_argument("--baseline", default=None, metavar="CHECKOUT",
                        help="also start the server of this checkout (e.g. a worktree of an older commit), "
                             "alternating with this one's, so that the ratio is measured side by side")  # fmt: skip
    parser.add_argument("--baseline-app", default="serve.app", help="the baseline's app module")
    args = parser.parse_args(argv)
    builds = {"this": (None, "jaxmr.serving.app")}
    if args.baseline:
        builds = {"baseline": (args.baseline, args.baseline_app), **builds}
    records = []
    for i in range(args.repeats):
        for label, (repo, _) in builds.items():
            records.append({"build": label, "run": i, **start_once(args.index, repo=repo)})
    summary = {}
    for label, (repo, app) in builds.items():
        mine = [r for r in records if r["build"] == label]
        summary[label] = {"ready_s_median": statistics.median(r["ready_s"] for r in mine),
                          "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in mine),
                          "heavy_modules_loaded": loaded_modules(app, repo), "checkout": repo or "."}  # fmt: skip
    print(json.dumps(summary, indent=2))
    notes = [f"Index: `{args.index}`; {args.repeats} starts each, alternating; medians:", ""]
    for label, row in summary.items():
        notes.append(f"- {label} ({row['checkout']}): ready in {row['ready_s_median']:.2f} s, peak RSS "
                     f"{row['peak_rss_mib_median']:.0f} MiB; heavy modules: "
                     f"{', '.join(row['heavy_modules_loaded']) or 'none'}")  # fmt: skip
    if "baseline" in summary:
        b, t = summary["baseline"], summary["this"]
        notes.append(f"\nThis checkout / baseline: start-up {t['ready_s_median'] / b['ready_s_median']:.2f}x, "
                     f"peak RSS {t['peak_rss_mib_median'] / b['peak_rss_mib_median']:.2f}x.")  # fmt: skip
    write_results(args.name, records, ["build", "run", "ready_s", "peak_rss_mib", "rss_mib"],
                  "Server start-up (`jaxmr serve` to a 200 from /readyz, warm-up on)", notes="\n".join(notes),
                  extra={"summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
