"""Server start-up: seconds from `jaxmr serve` to ready, resident memory, and which heavy modules it loaded.

    python -m bench.serve_startup --index runs/index [--repeats 3]

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
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import write_results

HEAVY = ("optax", "orbax", "grain", "tensorflow_datasets", "torch", "sklearn", "jaxmr.training")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start_once(index: str, timeout: float = 300) -> dict:
    """One start: seconds to ready, peak and current RSS (MiB), and the heavy modules the process loaded."""
    port = _free_port()
    env = {**os.environ, "JAXMR_WARM_UP": "true"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jaxmr.cli", "serve", "--index", index, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
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


def loaded_modules(app_module: str) -> list[str]:
    """The heavy modules that importing the CLI and the server app loads (what `jaxmr serve` pays for)."""
    test = "any(k == m or k.startswith(m + '.') for k in sys.modules)"
    code = f"import sys, jaxmr.cli, {app_module}; print(' '.join(m for m in {HEAVY!r} if {test}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="serve_startup")
    parser.add_argument("--app-module", default="jaxmr.serving.app", help="the module that defines the app")
    args = parser.parse_args(argv)
    runs = [start_once(args.index) for _ in range(args.repeats)]
    median = lambda key: sorted(r[key] for r in runs)[len(runs) // 2]
    result = {"index": args.index, "runs": runs, "ready_s": median("ready_s"), "peak_rss_mib": median("peak_rss_mib"),
              "heavy_modules_loaded": loaded_modules(args.app_module)}  # fmt: skip
    print(json.dumps(result, indent=2))
    loaded = ", ".join(result["heavy_modules_loaded"]) or "none"
    title = "Server start-up (`jaxmr serve`, warm-up on)"
    write_results(args.name, runs, ["ready_s", "peak_rss_mib", "rss_mib"], title,
                  notes=f"Index: `{args.index}`. Heavy modules the server process imports: {loaded}.",
                  extra={k: v for k, v in result.items() if k != "runs"})  # fmt: skip


if __name__ == "__main__":
    main()
