#!/usr/bin/env bash
# Starts a Redis Cluster of 3 masters and 3 replicas on loopback (ports 7000-7005), waits until
# every node reports cluster_state:ok and each master has its replica attached, and exports
# NORMANDY_TEST_REDIS_CLUSTER_URLS for the Redis suites' cluster runs.
#
# Sourced by .ci/run (`source .ci/redis-cluster.sh`), so the export reaches cargo; it can also be
# run by hand (`bash .ci/redis-cluster.sh`) and prints the export line. A cluster that is already
# up on those ports is reused. Data lives under NORMANDY_REDIS_CLUSTER_DIR (default
# /tmp/normandy-redis-cluster), without persistence: the tests need a cluster, not its data.
# Replicas are there so that WAIT 1 can be met: the store's WAIT tests run on the cluster too.

normandy_redis_cluster() {
    local dir="${NORMANDY_REDIS_CLUSTER_DIR:-/tmp/normandy-redis-cluster}"
    local ports=(7000 7001 7002 7003 7004 7005)
    local port
    command -v redis-server >/dev/null || { echo "redis-cluster: redis-server is required"; return 1; }
    command -v redis-cli >/dev/null || { echo "redis-cluster: redis-cli is required"; return 1; }

    if [ "$(redis-cli -p 7000 cluster info 2>/dev/null | tr -d '\r' | grep cluster_state)" = "cluster_state:ok" ]; then
        echo "redis-cluster: reusing the cluster on ports 7000-7005"
    else
        mkdir -p "$dir"
        for port in "${ports[@]}"; do
            # A node left over from an earlier run without its cluster is restarted clean.
            redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
            rm -rf "${dir:?}/$port"
            mkdir -p "$dir/$port"
            redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
                --cluster-enabled yes --cluster-config-file "$dir/$port/nodes.conf" \
                --cluster-node-timeout 5000 --save "" --appendonly no \
                --dir "$dir/$port" --logfile "$dir/$port/redis.log" \
                --pidfile "$dir/$port/redis.pid"
        done
        for port in "${ports[@]}"; do
            for _ in $(seq 1 50); do
                redis-cli -p "$port" ping >/dev/null 2>&1 && break
                sleep 0.1
            done
            redis-cli -p "$port" ping >/dev/null 2>&1 || { echo "redis-cluster: node $port did not start"; return 1; }
        done
        redis-cli --cluster create 127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002 \
            127.0.0.1:7003 127.0.0.1:7004 127.0.0.1:7005 --cluster-replicas 1 --cluster-yes \
            >"$dir/create.log" 2>&1 || { cat "$dir/create.log"; return 1; }
    fi

    # Every node agrees the cluster is ok, and 3 replicas are attached (WAIT 1 needs them).
    local ok=0
    for _ in $(seq 1 120); do
        ok=1
        for port in "${ports[@]}"; do
            if [ "$(redis-cli -p "$port" cluster info 2>/dev/null | tr -d '\r' | grep cluster_state)" != "cluster_state:ok" ]; then
                ok=0
            fi
        done
        local linked=0
        for port in 7000 7001 7002 7003 7004 7005; do
            if redis-cli -p "$port" info replication 2>/dev/null | tr -d '\r' | grep -q '^master_link_status:up'; then
                linked=$((linked + 1))
            fi
        done
        [ "$linked" -ge 3 ] || ok=0
        [ "$ok" = 1 ] && break
        sleep 0.5
    done
    if [ "$ok" != 1 ]; then
        echo "redis-cluster: the cluster did not reach cluster_state:ok with 3 replicas linked"
        for port in "${ports[@]}"; do redis-cli -p "$port" cluster info | head -3; done
        return 1
    fi
    export NORMANDY_TEST_REDIS_CLUSTER_URLS="redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002"
    echo "redis-cluster: up; export NORMANDY_TEST_REDIS_CLUSTER_URLS=$NORMANDY_TEST_REDIS_CLUSTER_URLS"
}

normandy_redis_cluster
