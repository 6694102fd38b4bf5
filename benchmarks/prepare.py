"""Setup cost of training on a large corpus: peak memory and wall time of `tformer train` for a new run
and for a resume, this checkout against another one (`--baseline`, e.g. a checkout of an older commit).

Each command runs in a process of its own (`python -m tformer train`, one training step of the `tiny`
preset so that setup dominates); its peak resident memory comes from the kernel (wait4), its time is
the wall clock around it. The corpus is the given parallel text repeated `--copies` times (the default
Multi30k train set x 35 is ~1M pairs). Runs are interleaved: new(current), new(baseline), then
`--repeats` rounds of resume(current), resume(baseline).

    python benchmarks/prepare.py --baseline /path/to/old-checkout/src --record auto
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "multi30k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_DATA / "train.en", help="source text to repeat")
    parser.add_argument("--tgt", type=Path, default=DEFAULT_DATA / "train.de", help="target text to repeat")
    parser.add_argument("--copies", type=int, default=35, help="times the text is repeated (default: 35)")
    parser.add_argument("--baseline", type=Path, default=None, help="the src/ directory of another checkout")
    parser.add_argument("--repeats", type=int, default=3, help="resumes timed per checkout (median reported)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    parser.add_argument(
        "--record", default=None, help="write a markdown record here ('auto': a new file in benchmarks/results/)"
    )
    args = parser.parse_args()
    copies = 1 if args.quick else args.copies
    codes = {"current": REPO / "src"}
    if args.baseline is not None:
        codes["baseline"] = args.baseline.resolve()
    lines = []
    with tempfile.TemporaryDirectory() as scratch:
        corpus = _repeated_corpus(Path(scratch), args.src, args.tgt, copies, limit=2000 if args.quick else None)
        pairs = sum(1 for _ in corpus[0].open(encoding="utf-8"))
        runs = {code: Path(scratch) / f"run-{code}" for code in codes}
        figures: dict[str, dict[str, list[tuple[float, float]]]] = {code: {"new": [], "resume": []} for code in codes}
        for code, src in codes.items():
            figures[code]["new"].append(_timed(src, _new_run_args(corpus, runs[code])))
        for repeat in range(1 if args.quick else args.repeats):
            for code, src in codes.items():
                resume = ["--out", str(runs[code]), "--resume", "--max-steps", str(repeat + 2), "--quiet"]
                figures[code]["resume"].append(_timed(src, resume))
        emitted = dict(bench="prepare", system="tformer", pairs=pairs)
        summaries = {(code, phase): _summary(figures[code][phase]) for code in codes for phase in ("new", "resume")}
        for (code, phase), (seconds, peak_mib) in summaries.items():
            lines.append(common.emit(**emitted, code=code, phase=phase, metric="wall_s", value=round(seconds, 2)))
            lines.append(common.emit(**emitted, code=code, phase=phase, metric="peak_rss_mib", value=round(peak_mib)))
        if "baseline" in codes:
            for phase in ("new", "resume"):
                current, baseline = summaries["current", phase], summaries["baseline", phase]
                for metric, pick in (("time", 0), ("memory", 1)):
                    ratio = round(baseline[pick] / current[pick], 2)
                    lines.append(
                        common.emit(**emitted, phase=phase, metric=f"{metric}_ratio_baseline_over_current", value=ratio)
                    )
    path = common.record_path("prepare", "cpu", args.record)
    if path is not None:
        notes = (
            f"{pairs:,} training pairs ({args.src.name}/{args.tgt.name} x {copies}); `tiny` preset, vocabulary 8000, "
            "one training step (new run: reading, tokenizer training, encoding; resume: one more step). "
            "Peak RSS from wait4 per process; wall time median over the resumes. "
            f"Baseline code: {codes.get('baseline', 'none')}."
        )
        common.write_record(
            path, title="Setup cost on a large corpus, cpu", env=common.environment("cpu"), lines=lines, notes=notes
        )


def _summary(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """(median wall seconds, largest peak MiB) of one code's runs of one phase."""
    return common.median([seconds for seconds, _ in runs]), max(peak for _, peak in runs)


def _repeated_corpus(directory: Path, src: Path, tgt: Path, copies: int, *, limit: int | None) -> tuple[Path, Path]:
    paths = []
    for side, text_path in (("src", src), ("tgt", tgt)):
        lines = text_path.read_text(encoding="utf-8").splitlines(keepends=True)[:limit]
        path = directory / f"train.{side}"
        with path.open("w", encoding="utf-8") as file:
            for _ in range(copies):
                file.writelines(lines)
        paths.append(path)
    return paths[0], paths[1]


def _new_run_args(corpus: tuple[Path, Path], run: Path) -> list[str]:
    return [
        "--train-src",
        str(corpus[0]),
        "--train-tgt",
        str(corpus[1]),
        "--preset",
        "tiny",
        "--vocab-size",
        "8000",
        "--max-steps",
        "1",
        "--device",
        "cpu",
        "--out",
        str(run),
        "--quiet",
    ]


def _timed(src: Path, train_args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of `python -m tformer train ARGS` with `src` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(src))
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "tformer", "train", *train_args], env=env)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"tformer train {' '.join(train_args)} failed (exit {process.returncode}) with {src}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


if __name__ == "__main__":
    main()
