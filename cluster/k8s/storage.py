"""The claims a cluster keeps its data on, and the Job that fills the weights claim.

- **Files** (ReadWriteMany, `--files-pvc`): mounted read-write at `FILES_MOUNT` on every Ray pod. The router
  replicas keep uploaded files and batch results in `batches.files_dir` there (pinned to `FILES_MOUNT/files` when
  the config leaves it unset), the batch jobs' drivers (on the head) and Ray Data tasks read and write the same
  folder, and the RayJob reads its input beside it. Router replicas on several pods need it: each upload lands on
  one replica and the next request may reach another.
- **Weights** (`--weights-pvc`): ReadOnlyMany for the serving pods, which mount it read-only; the fill Job mounts
  it read-write once. The claim asks for both modes, so it needs file storage (NFS, EFS, Filestore, Azure Files,
  CephFS); on block storage, fill a ReadWriteOnce claim with the Job and create the ReadOnlyMany claim from a
  snapshot of it.
- **Fill Job**: `modelfleet prepare CONFIG --download-under MOUNT` in the image: every model whose source is
  `MOUNT/<owner>/<name>` is downloaded from that Hugging Face Hub repo unless complete (`HF_TOKEN` from an optional
  Secret, for gated repos); packaged models are converted as in the image build. It is safe to run again.

The claims live in a kustomization of their own (`storage/`): `kubectl delete -k` of the serving overlay never
deletes data, and the serving overlay can be re-applied at will.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from cluster.k8s.constants import APP_LABELS
from cluster.k8s.errors import RenderError
from cluster.k8s.manifest import dump
from cluster.k8s.pod import container_security_context, pod_security_context
from cluster.k8s.profile import IMAGE_WORKDIR, RenderOptions
from deployments.config import ServingConfig

__all__ = [
    "FILES_MOUNT",
    "FILES_VOLUME",
    "HF_TOKEN_SECRET",
    "files_claim",
    "files_config",
    "files_volume",
    "weights_claim",
    "weights_fill",
]

FILES_MOUNT = "/batch"
FILES_VOLUME = "batch-files"
HF_TOKEN_SECRET = "modelfleet-hf-token"
_CONFIG_DIR = "/etc/modelfleet"
_FILL_TTL_S = 3600  # a finished Job goes after an hour; applying storage/ again then runs a new (idempotent) fill


def files_config(config: ServingConfig, options: RenderOptions) -> ServingConfig:
    """The config as the cluster runs it: `batches.files_dir` on the files claim.

    Raises:
        RenderError: several router replicas and batches on, without a files claim; or a `files_dir` that is not
            on the files claim.
    """
    batches = config.batches
    if not options.files_pvc:
        if config.router.num_replicas > 1 and batches.enabled:
            raise RenderError(
                f"router.num_replicas is {config.router.num_replicas} and batches are on: every router replica must "
                "see the same uploaded files, so pass --files-pvc NAME (a ReadWriteMany claim, mounted at "
                f"{FILES_MOUNT}), or set batches.enabled: false"
            )
        return config
    if batches.files_dir is None:
        pinned = batches.model_copy(update={"files_dir": Path(FILES_MOUNT) / "files"})
        return config.model_copy(update={"batches": pinned})
    if PurePosixPath(FILES_MOUNT) not in PurePosixPath(batches.files_dir).parents:
        raise RenderError(
            f"batches.files_dir {batches.files_dir} is not on the files claim: put it under {FILES_MOUNT} "
            f"(e.g. {FILES_MOUNT}/files) or leave it unset"
        )
    return config


def files_volume(claim: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The files claim as a pod volume and its read-write mount."""
    return (
        {"name": FILES_VOLUME, "persistentVolumeClaim": {"claimName": claim}},
        {"name": FILES_VOLUME, "mountPath": FILES_MOUNT},
    )


def _claim(name: str, modes: list[str], size: str, storage_class: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": modes, "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": dict(APP_LABELS)},
        "spec": spec,
    }


def files_claim(options: RenderOptions) -> dict[str, Any]:
    """The files PersistentVolumeClaim (ReadWriteMany)."""
    if not options.files_pvc:
        raise RenderError("no files claim to render: pass --files-pvc NAME")
    return _claim(options.files_pvc, ["ReadWriteMany"], options.files_size, options.storage_class)


def weights_claim(options: RenderOptions) -> dict[str, Any]:
    """The weights PersistentVolumeClaim: ReadOnlyMany for serving, ReadWriteOnce for the fill Job."""
    if not options.weights_pvc:
        raise RenderError("no weights claim to render: pass --weights-pvc NAME")
    return _claim(options.weights_pvc, ["ReadOnlyMany", "ReadWriteOnce"], options.weights_size, options.storage_class)


def weights_fill(config: ServingConfig, options: RenderOptions, image: str) -> list[dict[str, Any]]:
    """The ConfigMap holding the config and the Job that fills the weights claim from it.

    Raises:
        RenderError: no weights claim.
    """
    if not options.weights_pvc:
        raise RenderError("no weights claim to fill: pass --weights-pvc NAME")
    name = f"{config.name}-weights"
    labels = {**APP_LABELS, "app.kubernetes.io/component": "weights-fill"}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"config.yaml": dump(config.model_dump(mode="json", exclude_unset=True))},
    }
    container = {
        "name": "prepare",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": IMAGE_WORKDIR,
        "command": ["modelfleet", "prepare", f"{_CONFIG_DIR}/config.yaml", "--download-under", options.weights_mount],
        "env": [
            {"name": "HF_HUB_OFFLINE", "value": "0"},
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": HF_TOKEN_SECRET, "key": "token", "optional": True}},
            },
        ],
        "resources": {
            "requests": {"cpu": "1", "memory": "4Gi", "ephemeral-storage": "10Gi"},
            "limits": {"cpu": "2", "memory": "8Gi"},
        },
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "weights", "mountPath": options.weights_mount},
            {"name": "config", "mountPath": _CONFIG_DIR, "readOnly": True},
        ],
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": _FILL_TTL_S,
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": [
                        {"name": "weights", "persistentVolumeClaim": {"claimName": options.weights_pvc}},
                        {"name": "config", "configMap": {"name": name}},
                    ],
                },
            },
        },
    }
    return [config_map, job]
