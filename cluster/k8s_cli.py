"""`modelfleet render-k8s`: a config rendered into KubeRay manifests (the renderer is `cluster.k8s`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_render_parser"]


def add_render_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `render-k8s` to the `modelfleet` command."""
    from cluster.k8s import DEFAULT_OUT, RenderOptions

    field = RenderOptions.model_fields
    p = sub.add_parser(
        "render-k8s",
        help="render a config into KubeRay manifests (RayService, kustomize base and overlay); "
        "without CONFIG, re-render the committed k8s/ tree (make k8s)",
    )
    p.add_argument("config", nargs="?", help="serving config YAML (default: every overlay of the committed tree)")
    p.add_argument("--profile", choices=("cpu", "gpu"), help=field["profile"].description)
    p.add_argument(
        "--out",
        help=f"root of the tree: base/, overlays/<name>/ (default {DEFAULT_OUT}; the repository's without CONFIG)",
    )
    p.add_argument("--overlay", help="overlay name (default: <profile>-<config file name>)")
    p.add_argument("--image", help=field["image"].description)
    p.add_argument("--working-dir", help=field["working_dir"].description)
    p.add_argument("--weights-pvc", metavar="NAME", help=field["weights_pvc"].description)
    p.add_argument("--files-pvc", metavar="NAME", help=field["files_pvc"].description)
    p.add_argument("--storage-class", metavar="NAME", help=field["storage_class"].description)
    p.add_argument("--ingress-host", metavar="HOST", help=field["ingress_host"].description)
    p.add_argument("--redis-address", metavar="ADDRESS", help=field["redis_address"].description)
    p.add_argument("--redis-secret", metavar="NAME", help=field["redis_secret"].description)
    p.add_argument("--gpu-node-label", metavar="KEY", help=field["gpu_node_label"].description)
    p.add_argument(
        "--gpu-node-value",
        type=_gpu_node_value,
        action="append",
        default=[],
        metavar="TYPE=VALUE[,VALUE]",
        help=f"{field['gpu_node_values'].description} Repeatable.",
    )
    p.set_defaults(func=_cmd_render_k8s)


def _cmd_render_k8s(args: argparse.Namespace) -> int:
    from cluster import k8s
    from deployments.plan import PlanError

    given = {
        "profile": args.profile,
        "image": args.image,
        "working_dir": args.working_dir,
        "weights_pvc": args.weights_pvc,
        "files_pvc": args.files_pvc,
        "storage_class": args.storage_class,
        "ingress_host": args.ingress_host,
        "redis_address": args.redis_address,
        "redis_secret": args.redis_secret,
        "gpu_node_label": args.gpu_node_label,
        "gpu_node_values": dict(args.gpu_node_value) or None,
    }
    given = {key: value for key, value in given.items() if value is not None}
    try:
        if args.config is None:
            if given or args.overlay:
                print(
                    "error: render options apply to a CONFIG; without one the committed tree is rendered",
                    file=sys.stderr,
                )
                return 2
            written = k8s.render_tree(Path(args.out) if args.out else k8s.PROJECT_ROOT / k8s.DEFAULT_OUT)
        else:
            options = k8s.RenderOptions(**given)
            name = args.overlay or f"{options.profile}-{Path(args.config).stem}"
            written = k8s.render_overlay(Path(args.config), options, Path(args.out or k8s.DEFAULT_OUT), name=name)
    except (k8s.RenderError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}", flush=True)
    return 0


def _gpu_node_value(text: str) -> tuple[str, tuple[str, ...]]:
    kind, sep, values = text.partition("=")
    if not sep or not kind or not values:
        raise argparse.ArgumentTypeError(f"expected TYPE=VALUE[,VALUE], got {text!r}")
    return kind, tuple(v for v in values.split(",") if v)
