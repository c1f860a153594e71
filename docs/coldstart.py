"""Cold start of `make serve` to the first real answer, the idle memory of what it started, and the stop.

Run from the repo root on an installed checkout: `.venv/bin/python docs/coldstart.py` (uses port 8000).
"""

import json
import os
import signal
import subprocess
import time

import httpx
import psutil

t0 = time.monotonic()
proc = subprocess.Popen(
    ["make", "serve"],
    cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent),
    stdout=open("/tmp/make-serve.log", "wb"),
    stderr=subprocess.STDOUT,
    start_new_session=True,
)
body = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 24,
    "temperature": 0,
}
answer = None
while time.monotonic() - t0 < 600:
    try:
        r = httpx.post("http://127.0.0.1:8000/v1/chat/completions", json=body, timeout=60)
        if r.status_code == 200:
            answer = r.json()["choices"][0]["message"]["content"]
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
t1 = time.monotonic() - t0
e = httpx.post("http://127.0.0.1:8000/v1/embeddings", json={"model": "minilm", "input": "hi"}, timeout=60).status_code
time.sleep(10)
root = psutil.Process(proc.pid)
procs = root.children(recursive=True)
rss = pss = 0
for p in procs:
    try:
        m = p.memory_full_info()
        rss += m.rss
        pss += m.pss
    except psutil.Error:
        pass
print(
    json.dumps(
        {
            "first_answer_s": round(t1, 1),
            "answer": answer,
            "embeddings_status": e,
            "processes": len(procs),
            "rss_gib": round(rss / 2**30, 2),
            "pss_gib": round(pss / 2**30, 2),
        }
    )
)
os.killpg(proc.pid, signal.SIGTERM)
proc.wait(timeout=120)
print("exit", proc.returncode)
t2 = time.monotonic()
while time.monotonic() - t2 < 180:
    if "stopped the local cluster" in open("/tmp/make-serve.log").read():
        break
    time.sleep(0.5)
print("stopped after", round(time.monotonic() - t2, 1), "s")
