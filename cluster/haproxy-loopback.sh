#!/bin/sh
# Serve's HAProxy launcher for the local cluster (cluster/haproxy_local.py). Serve binds its stats and Prometheus
# listeners to every interface (`bind *:STATS_PORT`, `bind :METRICS_PORT`): rewrite those two binds to 127.0.0.1 in
# the config file that `-f` names (the HTTP frontend keeps router.host), then become the real binary (exec: Serve
# watches this very process id).
cfg=""
prev=""
for arg in "$@"; do
    if [ "$prev" = "-f" ]; then cfg="$arg"; fi
    prev="$arg"
done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
    for port in "${RAY_SERVE_HAPROXY_STATS_PORT:-8404}" "${RAY_SERVE_HAPROXY_METRICS_PORT:-9101}"; do
        sed -i -e "s/^\([[:space:]]*bind[[:space:]]\{1,\}\)\*\{0,1\}:${port}\([[:space:]]\|\$\)/\1127.0.0.1:${port}\2/" \
            "$cfg" || exit 1
    done
fi
exec "${MODELFLEET_HAPROXY_BINARY:?MODELFLEET_HAPROXY_BINARY is not set}" "$@"
