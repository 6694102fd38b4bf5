"""Helpers every benchmark script shares: JSON-line output, interleaved timing, environment records.

The protocol is ../../shared/BENCHMARKS.md: one JSON object per printed line, warm-up runs not counted,
the device synchronised before a timer is read, the median of several repeats with systems interleaved
(A B A B), and each run saved as a markdown record with hardware, versions, git commit and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HF_ATTENTION = "sdpa"  # torch's fused attention, named rather than left to transformers' default


def hf_rival(model: Any, *, bos_id: int, eos_id: int, pad_id: int) -> Any:
    """A Hugging Face MarianMTModel with `model`'s weights (`to_marian`), on torch's fused attention where
    this transformers can be told so (the records name the implementation each run used)."""
    from tformer.interop.marian import SpecialIds, to_marian

    hf_model = to_marian(model, SpecialIds(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id))
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation(HF_ATTENTION)
    return hf_model


def common_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark has: --device, --preset, --quick, --threads, --record."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: cpu)")
    parser.add_argument("--preset", default="small", choices=["small", "base"], help="model preset (default: small)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every system (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per system (median reported)")
    parser.add_argument(
        "--record", default=None, help="write a markdown record here ('auto': a new file in benchmarks/results/)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="after timing, print each system's top operators to stderr"
    )
    return parser


def emit(**fields: Any) -> dict[str, Any]:
    """Print one JSON line (flushed, so a killed run still leaves its lines) and return it."""
    print(json.dumps(fields), flush=True)
    return fields


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def print_profiles(systems: dict[str, Callable[[], Any]], device: str, *, rows: int = 25) -> None:
    """One more call of each system under torch's profiler; its operators by self time on the device
    (CUDA kernels on a GPU, else CPU time), printed to stderr. Not part of any timed figure."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort_by = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    for name, run in systems.items():
        with torch.profiler.profile(activities=activities) as profile:
            run()
            synchronize(device)
        print(f"== profile: {name}", file=sys.stderr)
        print(profile.key_averages().table(sort_by=sort_by, row_limit=rows), file=sys.stderr)


def interleaved_medians(
    systems: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: str, pause_s: float = 1.0
) -> dict[str, list[float]]:
    """Seconds per call for each system: `warmup` untimed rounds, then `repeats` rounds of A B C ...

    Each timed call starts after `pause_s` of idleness, so that the worker threads a previous system
    left spinning (OpenMP runtimes busy-wait for a while after a parallel region) do not steal the
    cores from the next one.
    """
    for _ in range(warmup):
        for run in systems.values():
            run()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, run in systems.items():
            synchronize(device)
            time.sleep(pause_s)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def environment(device: str) -> dict[str, Any]:
    """Hardware, versions and git commit, for the record."""
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tformer": _tformer_measured(),
        "git_commit": _git("rev-parse", "HEAD"),
        # tracked files only: the record of the run before (not yet committed) does not make the code dirty
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    for package in ("transformers", "ctranslate2"):
        try:
            info[package] = importlib.import_module(package).__version__
        except ImportError:
            info[package] = "not installed"
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _tformer_measured() -> str:
    """The version and place of the tformer the benchmark imported. The git fields describe this checkout,
    which is the code measured only when tformer comes from its src/ (`pip install -e .`, PYTHONPATH=src):
    an installed wheel or another checkout's editable install is measured under this checkout's commit."""
    import tformer

    package = Path(tformer.__file__).resolve().parent
    if package == RESULTS_DIR.parent.parent / "src" / "tformer":
        return f"{tformer.__version__} from this checkout's src/tformer"
    return f"{tformer.__version__} from {package}, not this checkout (its git fields do not describe it)"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(arg) for arg in sys.argv)


def record_path(
    what: str, device: str, requested: str | None, *, preset: str | None = None, results_dir: Path = RESULTS_DIR
) -> Path | None:
    """Where to save the record: `requested`, or for 'auto' results/<what>_<device>[_<preset>]_<date>.md,
    or <...>_run2.md, _run3.md ... when earlier records of the day hold those names (never replaced)."""
    if requested is None:
        return None
    if requested != "auto":
        return Path(requested)
    stem = "_".join([what, device, *([preset] if preset else []), dt.date.today().isoformat()])
    path, run = results_dir / f"{stem}.md", 2
    while path.exists():
        path, run = results_dir / f"{stem}_run{run}.md", run + 1
    return path


def write_record(path: Path, *, title: str, env: dict[str, Any], lines: list[dict[str, Any]], notes: str) -> None:
    """A markdown record: environment, exact command, notes, and every JSON line printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", "", "## Environment", ""]
    parts += [f"- {key}: {value}" for key, value in env.items()]
    parts += ["", "## Command", "", "```", command_line(), "```", "", "## Notes", "", notes.strip(), ""]
    parts += ["## Results (JSON lines as printed)", "", "```"]
    parts += [json.dumps(line) for line in lines]
    parts += ["```", ""]
    path.write_text("\n".join(parts))


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=RESULTS_DIR.parent)
        return result.stdout.strip()
    except OSError:
        return "unknown"
