"""Multi-host: two processes (jax.distributed on localhost) x 4 simulated CPU devices run `generate` over one
(data, model) mesh spanning both, and decode the single-process tokens."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adakv_jax import generation as gen
from adakv_jax.press import make_press
from adakv_jax.testing import random_prompts, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150
PROMPTS = random_prompts([40, 21, 33, 28], seed=4)
PRESS = make_press("ada-snapkv", budget=20, window=4, backend="xla")

_WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           initialization_timeout=60)
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
print("READY", flush=True)
from adakv_jax import generation as gen, sharding
from adakv_jax.press import Press
from adakv_jax.testing import tiny_model
cfg, params = tiny_model(num_kv_heads=2, num_heads=4, num_layers=2)
prompts, press = json.loads(sys.argv[3]), Press(**json.loads(sys.argv[4]))
mesh = sharding.make_mesh(data=4, model=2)
res = gen.generate(sharding.shard_params(params, mesh), cfg, prompts, max_new_tokens=3, press=press,
                   backend="xla", mesh=mesh)
print("TOKENS " + json.dumps({"tokens": res.token_ids, "budgets": res.budgets.tolist()}), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes():
  import dataclasses

  address = f"localhost:{_free_port()}"
  env = dict(
    os.environ,
    # 4 devices each; the other flags as this process has them, so both sides compute the same bits
    XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    + " --xla_force_host_platform_device_count=4",
    PYTHONPATH=str(ROOT),
    JAX_PLATFORMS="cpu",
  )
  args = [json.dumps(PROMPTS), json.dumps(dataclasses.asdict(PRESS))]
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, address, str(i), *args],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.skip(f"two jax.distributed processes did not finish within {TIMEOUT_S} s on this machine")
  return procs, outs


@pytest.mark.slow
def test_two_processes_over_one_mesh_decode_the_single_process_tokens():
  procs, outs = _run_two_processes()
  for p, (out, err) in zip(procs, outs):
    if "READY" not in out:
      pytest.skip(f"two jax.distributed processes could not start on localhost: {err.strip()[-600:]}")
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(next(l for l in out.splitlines() if l.startswith("TOKENS "))[7:]) for out, _ in outs]
  assert results[0] == results[1]  # every process holds the whole answer
  cfg, params = tiny_model(num_kv_heads=2, num_heads=4, num_layers=2)
  # one device with the mesh's head groups (each model shard selects within its own heads)
  ref = gen.generate(
    params, cfg, PROMPTS, max_new_tokens=3, press=PRESS.replace(head_groups=2), backend="xla"
  )
  assert results[0]["tokens"] == ref.token_ids
  assert results[0]["budgets"] == ref.budgets.tolist()
