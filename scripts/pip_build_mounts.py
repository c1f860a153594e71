"""Print the `podman build` flags that let the build's pip use this host's pip configuration.

The effective configuration (`pip config list`: files and PIP_* variables) is written to OUT as one pip.conf,
mounted at /etc/pip.conf (every pip reads it), and every local folder or file it names (find-links, file://
indexes, constraints, the CA bundle) is mounted read-only at the same path. Mounts exist only while RUN steps
run: nothing of the host ends up in the image. Standard library only.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse


def _settings(python: str) -> dict[str, dict[str, str]]:
    listed = subprocess.run([python, "-m", "pip", "config", "list"], check=True, capture_output=True, text=True).stdout
    sections: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or not section:
            continue
        value = value.strip().strip("'\"")
        # PIP_* variables (listed as ':env:') apply to every command and win over the files.
        (env if section == ":env:" else sections.setdefault(section, {}))[name] = value
    sections.setdefault("global", {}).update(env)
    return sections


def _local_paths(value: str) -> set[Path]:
    paths = set()
    for token in value.split():
        path = Path(unquote(urlparse(token).path)) if token.startswith("file://") else Path(token)
        if not path.is_absolute() or not path.exists():
            continue
        # A simple index links its files relative to itself (../../files/...): mount the folder above it.
        paths.add(path.parent if path.name == "simple" else path)
    return paths


def main(out: str, python: str = sys.executable) -> None:
    sections = _settings(python)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_dict(sections)
    with open(out, "w") as f:
        parser.write(f)
    mounts = {Path(out).resolve(): Path("/etc/pip.conf")}
    for values in sections.values():
        for value in values.values():
            mounts.update({path: path for path in _local_paths(value)})
    print(" ".join(f"--volume {src}:{dst}:ro" for src, dst in sorted(mounts.items())))


if __name__ == "__main__":
    main(*sys.argv[1:])
