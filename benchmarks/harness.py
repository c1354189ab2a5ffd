"""Shared benchmark harness: timing, machine facts, and the results files.

Every bench_<family>.py times its ops with `time_ms`, builds rows (dicts) that carry the shape,
the time, the bytes and flops counted for the floor, and calls `write_results`, which writes
benchmarks/results/<device>/<name>.json (with device, torch, CUDA and git commit) and a markdown
table beside it. Timings never appear in tests.
"""
import json
import os
import platform
import statistics
import subprocess
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Ceilings measured on the GPU machine (shared/anchors.md): device-to-device copy, bf16 matmul.
H100_COPY_GBPS = 3020.0
H100_BF16_TFLOPS = 790.0


def time_ms(fn, device, warmup=3, rep=10):
    """Median wall time of fn() in milliseconds, after warm-up; CUDA work timed with events."""
    if device.type == "cuda":
        try:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def git_commit():
    # The GPU machine gets a copy of the tree without .git: the caller passes the commit.
    if os.environ.get("MAMBA_EXT_GIT_COMMIT"):
        return os.environ["MAMBA_EXT_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(RESULTS_DIR), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}-threads-{torch.get_num_threads()}"


def device_slug(device):
    name = device_name(device).lower()
    for word in ("nvidia ", " 80gb", " hbm3", "-pcie"):
        name = name.replace(word, "")
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def machine_facts(device):
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(name, rows, device, columns):
    """Writes results/<device>/<name>.json and .md; `columns` orders the markdown table."""
    folder = os.path.join(RESULTS_DIR, device_slug(device))
    os.makedirs(folder, exist_ok=True)
    facts = machine_facts(device)
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump({"machine": facts, "rows": rows}, f, indent=1)
    lines = [f"# {name}", "", ", ".join(f"{k}: {v}" for k, v in facts.items()), "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(folder, name + ".md"), "w") as f:
        f.write(table)
    print(table)
    return folder


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
