"""Appending a benchmark run's section to benchmarks/RESULTS.md, with machine and date."""

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import tensorflow as tf

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Measured figures of the scripts in `benchmarks/`, one `## <benchmark> (<date>)` "
    "section per run. Headline figures are lines `key: value`.\n"
)


def machine_description():
    """CPU, core count, RAM, Python and TensorFlow versions, and the load average."""
    cpu = platform.machine()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = f"{cpu} ({line.split(':', 1)[1].strip()})"
                break
    with open("/proc/meminfo") as meminfo:
        kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpus = len(tf.config.list_physical_devices("GPU"))
    return (f"{cpu}, {os.cpu_count()} CPUs, {kib / 2**20:.1f} GiB RAM, {gpus} GPUs, "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}; "
            f"load average {load} at the end of the run")


def append_section(benchmark, body, headline):
    """Appends one run's section: command, machine, date, `body`, then `key: value` lines."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", *sys.argv])
    lines = "\n".join(f"{key}: {value}" for key, value in headline.items())
    section = (f"\n## {benchmark} ({date})\n\nCommand: `{command}`\n\n"
               f"Machine: {machine_description()}\n\n{body}\n\n{lines}\n")
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    with RESULTS.open("a") as results:
        results.write(section)
