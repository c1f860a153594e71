"""The project's container image as `make image` builds it: its tag (the one the rendered manifests name) and the
official Ray image it starts from by default.

`python -m cluster.k8s.image tag cpu|gpu` and `python -m cluster.k8s.image base cpu|gpu` print them for the Makefile.
"""

from __future__ import annotations

import sys
from importlib import metadata

from cluster.k8s.profile import default_image

__all__ = ["image_tag", "ray_base_image"]

# The Python of Ray's images, which must match the project's requires-python.
_PYTHON_TAG = "py311"


def image_tag(profile: str) -> str:
    """The tag `make image VLLM=<profile>` gives the image: the one the renderer writes into every Ray pod.

    Raises:
        RenderError: modelfleet is not installed, so its version is unknown.
    """
    return default_image(profile)


def ray_base_image(profile: str) -> str:
    """The official Ray image of the installed (pinned) Ray version: `rayproject/ray:<ray>-py311-cpu|gpu`."""
    return f"rayproject/ray:{metadata.version('ray')}-{_PYTHON_TAG}-{profile}"


def main(argv: list[str]) -> int:
    """Print the image tag or the default base image of a profile; 2 on a usage error."""
    what = {"tag": image_tag, "base": ray_base_image}
    if len(argv) != 2 or argv[0] not in what or argv[1] not in ("cpu", "gpu"):
        print("usage: python -m cluster.k8s.image tag|base cpu|gpu", file=sys.stderr)
        return 2
    print(what[argv[0]](argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
