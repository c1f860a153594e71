"""How `modelfleet deploy` (and the bench's cluster) starts Serve: the app goes in while Serve's proxy starts, so the
deploying thread must wait for the controller itself, never for an empty `serve.status()` (which is what Serve
answers before a controller exists, and after which `serve.run` would create a second controller)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A Ray cluster of its own in a child process: the session's cluster already runs Serve.
_SCRIPT = """
import sys, time
import ray
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from cluster.deploy import start_serve, wait_controller
from cluster.local import ClusterError, free_port

ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=sys.argv[1],
         log_to_driver=False)
began = time.monotonic()
try:
    wait_controller([], began + 2.0)
    print("returned without a controller", flush=True)
except ClusterError as exc:
    print(f"no controller: {exc} after {time.monotonic() - began:.1f} s", flush=True)
starter, failed = start_serve({"host": "127.0.0.1", "port": free_port()})
wait_controller(failed, time.monotonic() + 120)
ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)  # there, not merely an empty status


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Hello:
    def __call__(self, request):
        return "hello"


# serve.run while serve.start still waits for its proxy: it uses the controller start_serve made.
handle = serve.run(Hello.bind(), name="hello", route_prefix="/hello")
print("answer:", handle.remote(None).result(timeout_s=60), flush=True)
starter.join(timeout=120)
print("start failed:", [str(e) for e in failed], "alive:", starter.is_alive(), flush=True)
serve.shutdown()
ray.shutdown()
"""


def test_the_deploying_thread_waits_for_the_controller_start_serve_makes() -> None:
    temp_dir = tempfile.mkdtemp(prefix="r", dir=os.environ["RAY_TMPDIR"])
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, temp_dir], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    assert "no controller: Serve's controller did not start in time after 2." in out, out
    assert "answer: hello" in out, out
    assert "start failed: [] alive: False" in out, out
