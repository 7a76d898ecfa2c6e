"""The GPU acceptance run in one command: tests/gpu, then the offload, KV transfer, store
(host-to-device rows) and load benchmarks, each with a timeout, all recorded in ONE results
file: each step's command, exit code, duration and output, headed by device, torch and date.

    make gpu-check        # a GPU machine: its own python3 (PY=...), nothing fetched, no venv of ours
    make gpu-check-dry    # any machine: the same steps on CPU shapes (tests/gpu skip); CI runs it

The results go to $OUT/gpu_check.md when OUT is set, else ./gpu_check.md. A step that fails
or times out is recorded and the run goes on; the exit status is 1 if any step failed.

On a GPU machine with no network, Python packages the image lacks travel as wheels: here,
`make gpu-wheels` fills .gpu-wheels/ (git-ignored); there, this script installs those of them
whose distribution python3 does not already have into .gpu-site/ (pip --no-index --no-deps
--target) and puts it on every step's PYTHONPATH, with the repository root (strata is imported
from the tree). The workplace's device tool runs it as:

    run(command="if command -v make >/dev/null; then make gpu-check; else python3 benchmarks/gpu_check.py; fi",
        carry=[".gpu-wheels"], timeout_s=600)

and $OUT/gpu_check.md comes back with the reply. The GPU steps are sized for about 5 minutes on
an H100 (estimated from the shapes; a run-wide deadline, --budget-s, 470 s by default, bounds
every step's timeout so the whole run ends inside 8 minutes; a step left with no time is recorded
as not run).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"
SITE = ROOT / ".gpu-site"
STDERR_TAIL = 60  # lines of a step's stderr kept in the results (all of its stdout is kept)
MIN_STEP_S = 15  # a step with less time than this left is not started
USE_SITE = True  # .gpu-site on the steps' PYTHONPATH (not in a dry run: it holds another machine's wheels)


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    env: dict = field(default_factory=dict)  # added to the run's environment
    rc: int | None = None  # None: not run
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    note: str = ""


def gpu_steps(py: str) -> list[Step]:
    return [
        # -v: a line per test as it ends (a step cut at its timeout still says which passed);
        # a test over 120 s fails alone (pytest-timeout, in the image); durations size the next run
        Step("tests/gpu", [py, "-m", "pytest", "-v", "-s", "-rA", "--durations=15", "-o", "timeout=120",
                           "-p", "no:cacheprovider", "tests/gpu"], 180),
        Step("offload benchmark (8B-shaped blocks, 8 of them)", [py, "benchmarks/offload.py", "--layers", "8"], 150),
        Step("KV transfer benchmark (8B KV shapes)", [py, "benchmarks/kv_transfer.py"], 60),
        Step("store benchmark: CXL tier with host-to-device rows",
             [py, "benchmarks/store.py", "--tiers", "cxl", "--quick"], 90),
        Step("load benchmark (8B-shaped checkpoint, 8 layers, device cuda)",
             [py, "benchmarks/load.py", "--device", "cuda", "--layers", "8"], 210),
    ]


def dry_steps(py: str) -> list[Step]:
    """The same steps on CPU shapes; tests/gpu twice: as on a GPU-less machine (every test skips),
    then its device-agnostic tests on the CPU so the test code itself runs in CI."""
    return [
        Step("tests/gpu (no CUDA: every test skips)",
             [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"], 60,
             env={"CUDA_VISIBLE_DEVICES": ""}),
        Step("tests/gpu on the CPU (STRATA_GPU_TESTS_DEVICE=cpu)",
             [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"], 120,
             env={"STRATA_GPU_TESTS_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}),
        Step("offload benchmark --small (cpu)",
             [py, "benchmarks/offload.py", "--small", "--device", "cpu", "--steps", "1"], 90),
        Step("KV transfer benchmark --small (cpu)", [py, "benchmarks/kv_transfer.py", "--small", "--device", "cpu"],
             60),
        Step("store benchmark: CXL tier", [py, "benchmarks/store.py", "--tiers", "cxl", "--quick"], 60),
        Step("load benchmark (cpu, 2 layers)",
             [py, "benchmarks/load.py", "--device", "cpu", "--layers", "2", "--budget", "256MiB"], 90),
    ]


# -- wheels carried to a machine without a registry ----------------------------------------------

def wheel_dist(path: Path) -> str:
    """The distribution a wheel file holds (its name's first field)."""
    return path.name.split("-")[0]


def missing_wheels() -> tuple[list[Path], list[str]]:
    """The carried wheels whose distribution this python lacks, and the names it already has."""
    if not WHEELS.is_dir():
        return [], []
    need, have = [], []
    for whl in sorted(WHEELS.glob("*.whl")):
        try:
            have.append(f"{wheel_dist(whl)} {importlib.metadata.version(wheel_dist(whl))}")
        except importlib.metadata.PackageNotFoundError:
            need.append(whl)
    return need, have


def install_wheels(dry: bool) -> Step:
    """Install the missing carried wheels into .gpu-site (no index, no dependencies resolved:
    what they need is carried too, or already there). Dry: only say what would be installed."""
    need, have = missing_wheels()
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, need)]
    step = Step("carried wheels -> .gpu-site", argv, 120)
    lines = [f"already here: {', '.join(have) or 'none of them'}",
             f"missing: {', '.join(w.name for w in need) or 'none'}"]
    if not WHEELS.is_dir():
        lines = [f"no {WHEELS.name}/ (make gpu-wheels fills it): nothing to install"]
    if not need or dry:
        step.rc, step.stdout = 0, "\n".join(lines + (["dry run: nothing installed"] if dry and need else []))
        step.note = "pip not run"
        return step
    run_step(step, time.monotonic() + step.timeout_s, {})
    step.stdout = "\n".join(lines) + ("\n" + step.stdout if step.stdout else "")
    return step


# -- running and recording -------------------------------------------------------------------------

def step_env(extra: dict) -> dict:
    """The run's environment with the tree (and .gpu-site, when there) first on PYTHONPATH."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(ROOT), str(SITE) if USE_SITE and SITE.is_dir() else "", env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


def run_step(step: Step, deadline: float, extra_env: dict) -> None:
    """Run ``step`` in its own process group (a benchmark's children are stopped with it), for at
    most its timeout or what is left before ``deadline``."""
    left = deadline - time.monotonic()
    if left < MIN_STEP_S:
        step.note = f"not run: {max(left, 0):.0f} s left of the run's budget"
        return
    limit = min(step.timeout_s, left)
    t0 = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=step_env({**extra_env, **step.env}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        step.stdout, step.stderr = proc.communicate(timeout=limit)
        step.rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        step.stdout, step.stderr = proc.communicate()
        step.rc = 124
        step.note = f"timed out after {limit:.0f} s"
    step.seconds = time.monotonic() - t0


def header(dry: bool) -> list[str]:
    import torch

    if dry:
        device = "cpu (dry run: CPU shapes, CUDA not used)"
    elif torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (cuda:0 of {torch.cuda.device_count()})"
    else:
        device = "none: torch.cuda.is_available() is False"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    versions = []
    for dist in ("transformers", "accelerate", "safetensors", "diffusers"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    return [
        f"# Strata GPU check{' (dry run)' if dry else ''}",
        "",
        f"- device: {device}",
        f"- torch: {torch.__version__} (CUDA {torch.version.cuda or 'none'}); python {platform.python_version()} "
        f"at {sys.executable}",
        f"- {', '.join(versions)}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- host: {platform.node()}, {os.cpu_count()} CPUs; commit {commit}",
    ]


def fence(text: str) -> list[str]:
    return ["```", text.rstrip("\n"), "```"]


def render(head: list[str], steps: list[Step], total_s: float, finished: bool) -> str:
    failed = [s for s in steps if s.rc != 0]
    out = head + [f"- total: {total_s:.0f} s{'' if finished else ' so far (still running)'}; "
                  f"{len(steps)} steps, {len(failed)} failed or not run", "",
                  "| # | step | exit | seconds | note |", "| --- | --- | --- | --- | --- |"]
    for i, s in enumerate(steps, 1):
        out.append(f"| {i} | {s.name} | {'-' if s.rc is None else s.rc} | {s.seconds:.1f} | {s.note} |")
    for i, s in enumerate(steps, 1):
        out += ["", f"## {i}. {s.name}", "", f"command: `{shlex.join(s.argv)}`"
                + (f" with {' '.join(f'{k}={v}' for k, v in s.env.items())}" if s.env else ""),
                f"exit code: {'not run' if s.rc is None else s.rc}; duration {s.seconds:.1f} s"
                + (f"; {s.note}" if s.note else ""), "", "stdout:"]
        out += fence(s.stdout or "(none)")
        tail = s.stderr.rstrip("\n").splitlines()[-STDERR_TAIL:]
        if tail:
            out += ["", f"stderr (last {len(tail)} lines):"] + fence("\n".join(tail))
    return "\n".join(out) + "\n"


def results_path() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.md" if out else ROOT / "gpu_check.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU shapes on any machine; tests/gpu skip (what CI runs)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="the whole run's time limit in seconds (default 470 on a GPU, 170 dry)")
    args = ap.parse_args()
    global USE_SITE
    USE_SITE = not args.dry
    budget = args.budget_s or (170 if args.dry else 470)
    start = time.monotonic()
    deadline = start + budget
    path = results_path()
    head = header(args.dry)
    print("\n".join(head), flush=True)
    steps: list[Step] = []

    def record(step: Step | None = None, finished: bool = False) -> None:
        """Rewrite the results file after every step: a run cut short still leaves what it did."""
        if step is not None:
            steps.append(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(head, steps, time.monotonic() - start, finished))

    if not args.dry:
        import torch

        if not torch.cuda.is_available():
            record(Step("CUDA present", [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], 0,
                        rc=2, note="no CUDA here: use --dry (make gpu-check-dry) on a machine without a GPU"),
                   finished=True)
            print(f"gpu-check: no CUDA on this machine; results in {path}", file=sys.stderr)
            return 2
    record(install_wheels(args.dry))
    print(f"[{steps[-1].name}] {steps[-1].stdout}", flush=True)
    for step in dry_steps(sys.executable) if args.dry else gpu_steps(sys.executable):
        print(f"\n[{step.name}] {shlex.join(step.argv)}", flush=True)
        run_step(step, deadline, {})
        record(step)
        print(step.stdout.rstrip("\n"), flush=True)
        if step.rc != 0:
            print("\n".join(step.stderr.rstrip("\n").splitlines()[-STDERR_TAIL:]), file=sys.stderr, flush=True)
        print(f"[{step.name}] exit {'not run' if step.rc is None else step.rc}, {step.seconds:.1f} s"
              + (f" ({step.note})" if step.note else ""), flush=True)
    record(finished=True)
    failed = [s.name for s in steps if s.rc != 0]
    print(f"\ngpu-check{' (dry)' if args.dry else ''}: {len(steps) - len(failed)} of {len(steps)} steps passed in "
          f"{time.monotonic() - start:.0f} s" + (f"; failed or not run: {', '.join(failed)}" if failed else ""))
    print(f"gpu-check: results in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
