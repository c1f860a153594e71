"""Cluster operations: the local Ray cluster, deploying apps, Kubernetes manifests, batch jobs, benchmarks."""

import os

# Ray dials a loopback address as the host's routable IP (ray._private.services.resolve_ip_for_localhost) unless its
# multi-node mode is off. The local cluster binds 127.0.0.1 only, so on a machine with a default route a driver
# would dial an address nothing listens on. Ray reads the switch once, when it is imported: set it before that.
# (Its name speaks of Windows and macOS, where the mode is off by default; on Linux it means "this machine only".)
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
for _key, _value in LOCAL_ONLY_ENV.items():
    os.environ.setdefault(_key, _value)
