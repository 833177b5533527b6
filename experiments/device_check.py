"""Device check: the kernel tests run natively, then the kernel and end-to-end decode benchmarks, in one run
whose outputs land in experiments/results/ under the device's name (and, with --out, in that folder too).

    python -m experiments.device_check               # on the accelerator (experiments/device_check.sh)
    python -m experiments.device_check --rehearse    # here, on CPU: kernels interpreted, every size shrunk

Stages, each a subprocess with its own time limit, so a crash or a hung compile costs only that stage:

    kernel_tests   python -m pytest -q tests/kernels (gated per backend by tests/kernels/gating.py: the
                   Triton lowerings run natively on a GPU, the TPU ones on a TPU, both interpreted on CPU);
                   counts, failures and skip reasons from pytest's JUnit XML
    bench_kernels  experiments/bench_kernels.py (--quick when rehearsing): paged decode bandwidth vs fill
                   and skew, cross-head top-k vs lax.top_k
    bench_decode   experiments/bench_decode_device.py (--rehearse when rehearsing): end-to-end decode and
                   prefill, full cache vs ada-snapkv@128 token / page granularity

Files (SLUG from the device kind, e.g. nvidia_h200; a rehearsal's names start with tmp_rehearse_, which
git ignores): device_check_SLUG.json (platform, versions, missing packages, each stage's command, exit
status, wall time, test summary) and .log (every stage's output), bench_kernels_SLUG.json/.png,
bench_decode_device_SLUG.json/.png. The JSON is rewritten after every stage. Exit status 0 when every
stage that ran succeeded. The parent never imports jax: each child owns the whole accelerator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
STAGES = ("kernel_tests", "bench_kernels", "bench_decode")
STAGE_LIMIT_S = {"kernel_tests": 170, "bench_kernels": 130, "bench_decode": 300}  # on an accelerator
NEEDED = (
  "jax",
  "jaxlib",
  "numpy",
  "flax",
  "safetensors",
  "tokenizers",
  "jinja2",
  "tqdm",
  "matplotlib",
  "pytest",
  "hypothesis",
)
OTHERS = ("jax-cuda13-plugin", "jax-cuda12-plugin", "triton", "pytest-xdist", "orbax-checkpoint", "gguf")
PROBE = f"""
import importlib.metadata as md, importlib.util as iu, json, platform, re, sys
import jax
def version(name):
  try:
    return md.version(name)
  except md.PackageNotFoundError:
    return None
kind = jax.devices()[0].device_kind
print("PROBE " + json.dumps(dict(
    python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
    backend=jax.default_backend(), device_kind=kind, devices=[str(d) for d in jax.devices()],
    slug=re.sub("[^a-z0-9]+", "_", kind.lower()).strip("_"),
    versions={{n: version(n) for n in {NEEDED + OTHERS!r}}},
    missing=[n for n in {NEEDED!r} if iu.find_spec(n) is None])))
"""


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rehearse", action="store_true", help="CPU rehearsal: tiny sizes, kernels interpreted")
  p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
  p.add_argument(
    "--deadline-s",
    type=float,
    default=None,
    help="start no stage after this many seconds; a running one is cut at it "
    "(default 420 on an accelerator, 1200 rehearsing)",
  )
  p.add_argument("--out", default=None, help="also copy every file written into this folder (the run's $OUT)")
  p.add_argument(
    "--pytest-workers",
    type=int,
    default=None,
    help="pytest-xdist workers for the kernel tests (default: 4 on a GPU when xdist is there)",
  )
  return p.parse_args(argv)


def run_logged(cmd: list[str], log, limit_s: float, env: dict) -> dict:
  """Runs cmd in its own process group, its output to stdout and the log, killed at limit_s."""
  log.write(f"\n===== {' '.join(cmd)} (limit {limit_s:.0f} s) =====\n")
  log.flush()
  t0 = time.monotonic()
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=0
  )
  killed = threading.Event()

  def kill():
    killed.set()
    os.killpg(proc.pid, 9)  # the child's own process group (its workers too), nothing else

  timer = threading.Timer(limit_s, kill)
  timer.start()
  try:
    for line in proc.stdout:
      sys.stdout.write(line)
      log.write(line)
    rc = proc.wait()
  except BaseException:  # an outer timeout's SIGINT: leave no stage running on the device
    kill()
    proc.wait()
    raise
  finally:
    timer.cancel()
  log.flush()
  return {"cmd": cmd, "rc": rc, "timed_out": killed.is_set(), "wall_s": round(time.monotonic() - t0, 1)}


def junit_summary(path: Path) -> dict:
  """Counts, failures (test id and the start of the message) and skip reasons from pytest's JUnit XML."""
  if not path.exists():
    return {"junit": "missing (pytest did not finish)"}
  counts, failed, skipped = {"passed": 0, "failed": 0, "skipped": 0}, [], {}
  for c in ET.parse(path).getroot().iter("testcase"):
    bad, skip = next((x for x in c if x.tag in ("failure", "error")), None), c.find("skipped")
    if bad is not None:
      failed.append(
        {"test": f"{c.get('classname')}::{c.get('name')}", "message": (bad.get("message") or "")[:600]}
      )
    elif skip is not None:
      skipped[skip.get("message") or ""] = skipped.get(skip.get("message") or "", 0) + 1
    counts["failed" if bad is not None else "skipped" if skip is not None else "passed"] += 1
  return {"counts": counts, "failed": failed, "skip_reasons": skipped}


def kernel_tests(a, probe, stem, env, limit_s):
  """Each stage: (command, environment, finish(result) that adds what the stage left behind)."""
  xml = RESULTS / f"tmp_{stem}_junit.xml"
  cmd = [
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    "-rfEs",
    "--durations=8",
    f"--junitxml={xml}",
    "tests/kernels",
  ]
  workers = a.pytest_workers
  if workers is None:
    workers = 4 if probe["backend"] == "gpu" and probe["versions"].get("pytest-xdist") else 0
  if workers:  # processes share the GPU: none may grab most of its memory up front
    cmd[4:4] = ["-n", str(workers)]
    env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if probe["backend"] == "gpu":  # correctness only: skip XLA's GEMM autotuning (compile time)
    env = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip())

  def finish(result):
    result.update(junit_summary(xml), pytest_workers=workers)
    xml.unlink(missing_ok=True)

  return cmd, env, finish


def bench_kernels(a, probe, stem, env, limit_s):
  """bench_kernels.py names its files itself; they are renamed after the device (and anything they
  would have replaced is put back)."""
  package = (REPO / "experiments" / "__init__.py").exists()
  cmd = (
    [sys.executable, "-m", "experiments.bench_kernels"]
    if package
    else [sys.executable, "experiments/bench_kernels.py"]
  ) + ["--quick"] * a.rehearse
  produced = [RESULTS / f"bench_kernels{'_quick' * a.rehearse}.{ext}" for ext in ("json", "png")]
  saved = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in produced if p.exists()}

  def finish(result):
    result["files"] = []
    for p in produced:
      if p.exists() and (p not in saved or p.stat().st_mtime_ns != saved[p][1]):  # written by this run
        dst = RESULTS / f"{stem.replace('device_check', 'bench_kernels')}{p.suffix}"
        os.replace(p, dst)
        result["files"].append(dst.name)
      if p in saved and not p.exists():
        p.write_bytes(saved[p][0])

  return cmd, env, finish


def bench_decode(a, probe, stem, env, limit_s):
  name = stem.replace("device_check", "bench_decode_device")
  cmd = [
    sys.executable,
    "-m",
    "experiments.bench_decode_device",
    "--name",
    name,
    "--deadline-s",
    str(max(limit_s - 90, 10)),
  ] + ["--rehearse"] * a.rehearse

  def finish(result):
    result["files"] = [f"{name}.{ext}" for ext in ("json", "png") if (RESULTS / f"{name}.{ext}").exists()]

  return cmd, env, finish


STAGE_FNS = {"kernel_tests": kernel_tests, "bench_kernels": bench_kernels, "bench_decode": bench_decode}


def main(argv=None) -> int:
  a = parse_args(argv)
  t0 = time.monotonic()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  out = subprocess.run(
    [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  line = next((l for l in out.stdout.splitlines() if l.startswith("PROBE ")), None)
  if line is None:
    print(out.stdout + out.stderr, file=sys.stderr)
    return 3
  probe = json.loads(line[len("PROBE ") :])
  accel = probe["backend"] in ("gpu", "tpu")
  if not accel and not a.rehearse:
    print(f"no accelerator ({probe['backend']}): run with --rehearse on CPU", file=sys.stderr)
    return 2
  deadline = a.deadline_s if a.deadline_s is not None else (420 if accel else 1200)
  stem = f"{'tmp_rehearse_' if a.rehearse else ''}device_check_{probe['slug']}"
  RESULTS.mkdir(parents=True, exist_ok=True)
  report = {
    "script": "device_check.py",
    "rehearse": a.rehearse,
    "deadline_s": deadline,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "probe": probe,
    "nvidia_smi": nvidia_smi(),
    "stages": {},
  }
  print(json.dumps(probe, indent=1), flush=True)
  with open(RESULTS / f"{stem}.log", "w") as log:
    for stage in a.stages:
      left = deadline - (time.monotonic() - t0)
      if left < 20:
        report["stages"][stage] = {"skipped": "deadline"}
        continue
      limit = min(STAGE_LIMIT_S[stage] * (1 if accel else 4), left)
      cmd, stage_env, finish = STAGE_FNS[stage](a, probe, stem, env, limit)
      print(f"\n== {stage} (limit {limit:.0f} s)", flush=True)
      try:
        result = run_logged(cmd, log, limit, stage_env)
      except KeyboardInterrupt:
        report["stages"][stage] = {"cmd": cmd, "rc": None, "interrupted": True}
        break
      finish(result)
      report["stages"][stage] = result
      report["wall_s"] = round(time.monotonic() - t0, 1)
      write_report(report, stem, a.out)
  report["ok"] = all(s.get("rc") == 0 for s in report["stages"].values() if "skipped" not in s)
  write_report(report, stem, a.out)
  print(
    json.dumps(
      {k: {f: v.get(f) for f in ("rc", "wall_s", "counts", "skipped")} for k, v in report["stages"].items()},
      indent=1,
    )
  )
  return 0 if report["ok"] else 1


def nvidia_smi() -> str | None:
  if shutil.which("nvidia-smi") is None:
    return None
  r = subprocess.run(
    [
      "nvidia-smi",
      "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem",
      "--format=csv",
    ],
    capture_output=True,
    text=True,
    timeout=30,
  )
  return (r.stdout + r.stderr).strip()


def write_report(report: dict, stem: str, out: str | None) -> None:
  (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
  if out:
    files = [f"{stem}.json", f"{stem}.log"]
    files += [f for s in report["stages"].values() for f in s.get("files", [])]
    Path(out).mkdir(parents=True, exist_ok=True)
    for f in files:
      shutil.copy2(RESULTS / f, Path(out) / f)


if __name__ == "__main__":
  sys.exit(main())
