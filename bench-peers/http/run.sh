#!/usr/bin/env bash
# Side by side: the streamcache proxy example, nginx (proxy_cache, proxy_cache_lock on,
# sendfile on) and Varnish (built-in VCL; malloc and file storage) as caching reverse proxies
# of the same origin on 127.0.0.1 (bench-peers/http/origin.py). Not run by CI.
#
#   bash bench-peers/http/run.sh            # installs what is missing (Debian packages), builds, measures
#   SKIP_INSTALL=1 bash bench-peers/http/run.sh
#
# Prints markdown tables (and writes them to $OUT, default /tmp/http-bench/results.md):
# herd, late joiner, Range mid-download, origin dying mid-body, 1 MiB hits (throughput and
# CPU per hit), 4 clients on a 100 MiB object, restart with the origin down, and the caching
# semantics table. One run; the numbers move with the machine's load.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/bench-peers/http"
W=${WORK_DIR:-/tmp/http-bench}
OUT=${OUT:-$W/results.md}
ORIGIN_PORT=${ORIGIN_PORT:-18080}
declare -A PORT=([streamcache]=18081 [nginx]=18082 [varnish-malloc]=18083 [varnish-file]=18084)
read -r -a PROXIES <<<"${ONLY:-streamcache nginx varnish-malloc varnish-file}"
HIT_SECS=${HIT_SECS:-10}
HZ=$(getconf CLK_TCK)

say() { echo "== $*" >&2; }

if [ -z "${SKIP_INSTALL:-}" ]; then
    need=()
    command -v nginx >/dev/null || need+=(nginx)
    command -v varnishd >/dev/null || need+=(varnish)
    command -v wrk >/dev/null || need+=(wrk)
    command -v curl >/dev/null || need+=(curl)
    command -v python3 >/dev/null || need+=(python3)
    if [ ${#need[@]} -gt 0 ]; then
        say "installing ${need[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi
# The distribution's services are not wanted: each proxy runs here with its own config.
for svc in nginx varnish varnishncsa; do
    systemctl stop "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1 || true
done

say "building the proxy example"
(cd "$ROOT" && cargo build --release --example proxy --features tokio >&2) || exit 1
SC_BIN="$ROOT/target/release/examples/proxy"

rm -rf "$W" && mkdir -p "$W"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    [ -f "$W/nginx/nginx.pid" ] && kill "$(cat "$W/nginx/nginx.pid")" 2>/dev/null
    for v in varnish-malloc varnish-file; do
        [ -f "$W/$v/pid" ] && kill "$(cat "$W/$v/pid")" 2>/dev/null
    done
}
trap cleanup EXIT

ORIGIN_PID=
start_origin() {
    python3 "$HERE/origin.py" "$ORIGIN_PORT" 2>"$W/origin.log" &
    ORIGIN_PID=$!
    PIDS+=("$ORIGIN_PID")
    wait_port "$ORIGIN_PORT"
}
stop_origin() { kill "$ORIGIN_PID" 2>/dev/null; wait "$ORIGIN_PID" 2>/dev/null; }
origin_count() { curl -s "http://127.0.0.1:$ORIGIN_PORT/__count?p=$1"; }

wait_port() {
    for _ in $(seq 200); do
        curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.05
    done
    say "port $1 did not open"
    return 1
}

nginx_conf() {
    mkdir -p "$W/nginx/cache" "$W/nginx/tmp"
    cat >"$W/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path $W/nginx/tmp/body;
    proxy_temp_path $W/nginx/tmp/proxy;
    fastcgi_temp_path $W/nginx/tmp/fastcgi;
    uwsgi_temp_path $W/nginx/tmp/uwsgi;
    scgi_temp_path $W/nginx/tmp/scgi;
    proxy_cache_path $W/nginx/cache levels=1:2 keys_zone=c:64m max_size=4g inactive=1d use_temp_path=off;
    upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 16; }
    server {
        listen 127.0.0.1:${PORT[nginx]};
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache c;
            proxy_cache_lock on;
            proxy_cache_revalidate on;
        }
    }
}
EOF
}

# start_proxy NAME: starts it on its port (reusing its cache directory).
start_proxy() {
    local name=$1 port=${PORT[$1]}
    case $name in
        streamcache)
            mkdir -p "$W/streamcache"
            RUST_LOG=warn "$SC_BIN" --listen "127.0.0.1:$port" \
                --upstream "http://127.0.0.1:$ORIGIN_PORT" --dir "$W/streamcache/cache" --purge loopback \
                2>>"$W/streamcache/log" &
            echo $! >"$W/streamcache/pid"
            PIDS+=("$!")
            ;;
        nginx)
            [ -f "$W/nginx/nginx.conf" ] || nginx_conf
            nginx -c "$W/nginx/nginx.conf" -e "$W/nginx/error.log"
            ;;
        varnish-malloc | varnish-file)
            mkdir -p "$W/$name"
            local storage="malloc,2G"
            [ "$name" = varnish-file ] && storage="file,$W/$name/storage.bin,4G"
            varnishd -a "127.0.0.1:$port" -b "127.0.0.1:$ORIGIN_PORT" -s "$storage" \
                -n "$W/$name/work" -P "$W/$name/pid" >/dev/null 2>&1
            ;;
    esac
    for _ in $(seq 200); do
        curl -s -o /dev/null "http://127.0.0.1:$port/__probe" && return 0
        sleep 0.05
    done
    say "$name did not start"
}

stop_proxy() {
    local name=$1 pidfile
    case $name in
        streamcache) pidfile="$W/streamcache/pid" ;;
        nginx) pidfile="$W/nginx/nginx.pid" ;;
        *) pidfile="$W/$name/pid" ;;
    esac
    local pid
    pid=$(cat "$pidfile" 2>/dev/null) || return 0
    kill -INT "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null
    rm -f "$pidfile"
    # Wait for the port to close.
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:${PORT[$name]}/" || return 0
        sleep 0.05
    done
}

# The processes whose CPU a proxy costs: its main process and all its children.
proxy_pids() {
    local name=$1 pid
    case $name in
        streamcache) pid=$(cat "$W/streamcache/pid") ;;
        nginx) pid=$(cat "$W/nginx/nginx.pid") ;;
        *) pid=$(cat "$W/$name/pid") ;;
    esac
    echo "$pid" $(pgrep -P "$pid")
}

cpu_ticks() {
    local total=0 p
    for p in $(proxy_pids "$1"); do
        [ -r "/proc/$p/stat" ] || continue
        # utime and stime: fields 14 and 15 (after the command in parentheses).
        local t
        t=$(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')
        total=$((total + t))
    done
    echo "$total"
}

url() { echo "http://127.0.0.1:${PORT[$1]}$2"; }
CURL_FMT='%{http_code} %{time_starttransfer} %{time_total} %{size_download}'
median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print "-"; else print a[int((NR+1)/2)]}'; }
ms() { awk '{printf "%d", $1 * 1000 + 0.5}'; }

MIB8=8388608
declare -A R

measure_streaming() {
    local name=$1 p
    # Herd: 20 clients at once on an 8 MiB object the origin sends over 2.5 s.
    p="/slow/herd-$name"
    local jobs=()
    for i in $(seq 20); do
        curl -s -o /dev/null -w "$CURL_FMT\n" "$(url "$name" "$p?size=$MIB8&secs=2.5")" >"$W/herd.$i" &
        jobs+=($!)
    done
    wait "${jobs[@]}"
    cat "$W"/herd.* >"$W/herd-$name.txt"
    rm -f "$W"/herd.*
    R[$name,herd_origin]=$(origin_count "$p")
    R[$name,herd_ttfb]=$(awk '{print $2}' "$W/herd-$name.txt" | median | ms)
    R[$name,herd_total]=$(awk '{print $3}' "$W/herd-$name.txt" | median | ms)
    R[$name,herd_ok]=$(awk '$1==200 && $4=='$MIB8'' "$W/herd-$name.txt" | wc -l)

    # Late joiner: a second client 1.25 s into the download.
    p="/slow/late-$name"
    curl -s -o /dev/null "$(url "$name" "$p?size=$MIB8&secs=2.5")" &
    local first=$!
    sleep 1.25
    read -r code ttfb total size < <(curl -s -o /dev/null -w "$CURL_FMT\n" "$(url "$name" "$p?size=$MIB8&secs=2.5")")
    wait $first
    R[$name,late]="$code, first byte $(echo "$ttfb" | ms) ms, done $(echo "$total" | ms) ms, origin $(origin_count "$p")"

    # Range mid-download: bytes 0-1023, 0.5 s into the download.
    p="/slow/range-$name"
    curl -s -o /dev/null "$(url "$name" "$p?size=$MIB8&secs=2.5")" &
    first=$!
    sleep 0.5
    read -r code ttfb total size < <(curl -s -o /dev/null -r 0-1023 -w "$CURL_FMT\n" "$(url "$name" "$p?size=$MIB8&secs=2.5")")
    wait $first
    R[$name,range]="$code, $size bytes in $(echo "$total" | ms) ms"

    # Origin dying mid-body: 3 clients; curl exits 18/56 on a cut body, 0 on a clean one.
    p="/die/die-$name"
    jobs=()
    for i in 1 2 3; do
        (curl -s -o /dev/null -w "%{size_download}" "$(url "$name" "$p?size=$MIB8&secs=2")"; echo " exit=$?") >"$W/die.$i" &
        jobs+=($!)
    done
    wait "${jobs[@]}"
    local outcomes
    outcomes=$(cat "$W"/die.* | awk '{print $2}' | sort | uniq -c | awk '{printf "%s×%s ", $1, $2}')
    rm -f "$W"/die.*
    curl -s -o /dev/null "$(url "$name" "$p?size=$MIB8&secs=2")"
    R[$name,die]="${outcomes}; origin asked $(origin_count "$p")× (incl. a 4th request after)"
}

measure_hits() {
    local name=$1 p before after out reqs rps
    p=$(url "$name" "/fast/hit-$name?size=1048576")
    curl -s -o /dev/null "$p"; sleep 0.3; curl -s -o /dev/null "$p"
    before=$(cpu_ticks "$name")
    out=$(wrk -t2 -c32 -d"${HIT_SECS}s" "$p" 2>&1)
    after=$(cpu_ticks "$name")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%d", $2}')
    R[$name,hit_rps]=$rps
    R[$name,hit_cpu]=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN {printf "%.0f", t * 1000 / hz * 1000 / n}')

    # 4 clients (curl to /dev/null), each downloading the 100 MiB object 5 times.
    p=$(url "$name" "/fast/big-$name?size=104857600")
    curl -s -o /dev/null "$p"; sleep 0.5; curl -s -o /dev/null "$p"
    before=$(cpu_ticks "$name")
    local t0 t1 jobs=()
    t0=$(date +%s.%N)
    for i in 1 2 3 4; do
        (for _ in 1 2 3 4 5; do curl -s -o /dev/null "$p"; done) &
        jobs+=($!)
    done
    wait "${jobs[@]}"
    t1=$(date +%s.%N)
    after=$(cpu_ticks "$name")
    R[$name,big_gbs]=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", 20 * 104857600 / (b - a) / 1e9}')
    R[$name,big_cpu]=$(awk -v t=$((after - before)) -v hz="$HZ" 'BEGIN {printf "%.0f", t * 1000 / hz / 20}')
    R[$name,hit_origin]="$(origin_count "/fast/hit-$name") / $(origin_count "/fast/big-$name")"
}

measure_restart() {
    local name=$1 p code size
    p="/fast/restart-$name?size=1048576"
    curl -s -o /dev/null "$(url "$name" "$p")"; sleep 0.5; curl -s -o /dev/null "$(url "$name" "$p")"
    sleep 0.5
    stop_proxy "$name"
    stop_origin
    start_proxy "$name"
    read -r code size < <(curl -s -o /dev/null -w '%{http_code} %{size_download}\n' --max-time 10 "$(url "$name" "$p")")
    R[$name,restart]="$code, $size bytes"
    start_origin
}

sem() {
    local name=$1 base="/sem" c1 c2 b s
    local u; u() { url "$name" "$base/$1/$name"; }
    # no-store / private: a second request that reaches the origin means not cached.
    for case in nostore private; do
        curl -s -o /dev/null "$(u $case)"; curl -s -o /dev/null "$(u $case)"
        [ "$(origin_count "$base/$case/$name")" = 2 ] && R[$name,sem_$case]="not cached" || R[$name,sem_$case]="**cached**"
    done
    # Set-Cookie: passed to the first client? stored?
    c1=$(curl -s -D - -o /dev/null "$(u cookie)" | grep -ci '^set-cookie')
    curl -s -o /dev/null "$(u cookie)"
    [ "$(origin_count "$base/cookie/$name")" = 2 ] && s="not cached" || s="**cached**"
    [ "$c1" -ge 1 ] && s="$s, passed" || s="$s, **cookie dropped**"
    R[$name,sem_cookie]=$s
    # Authorization: forwarded? response stored?
    b=$(curl -s -H 'Authorization: Bearer x' "$(u auth)")
    curl -s -o /dev/null -H 'Authorization: Bearer x' "$(u auth)"
    [ "$(origin_count "$base/auth/$name")" = 2 ] && s="not cached" || s="**cached**"
    case $b in *auth=yes*) s="forwarded, $s" ;; *) s="**not forwarded**, $s" ;; esac
    R[$name,sem_auth]=$s
    # max-age=2, again after 3 s.
    curl -s -o /dev/null "$(u maxage2)"; sleep 3; curl -s -o /dev/null "$(u maxage2)"
    [ "$(origin_count "$base/maxage2/$name")" = 2 ] && R[$name,sem_maxage]="refetched" || R[$name,sem_maxage]="**served from cache**"
    # HEAD after a GET.
    curl -s -o /dev/null "$(u head)"
    R[$name,sem_head]=$(curl -s -I -o /dev/null -w '%{http_code}' "$(u head)")
    [ "$(origin_count "$base/head/$name")" = 1 ] && R[$name,sem_head]="${R[$name,sem_head]} (hit)" || R[$name,sem_head]="${R[$name,sem_head]} (origin)"
    # Client If-None-Match matching the stored ETag.
    curl -s -o /dev/null "$(u etag)"; sleep 0.2
    R[$name,sem_inm]=$(curl -s -o /dev/null -H 'If-None-Match: "v1"' -w '%{http_code} (%{size_download} bytes)' "$(u etag)")
    # Vary: X-Lang: en, fr, en.
    local e1 f1 e2
    e1=$(curl -s -H 'X-Lang: en' "$(u vary)"); sleep 0.2
    f1=$(curl -s -H 'X-Lang: fr' "$(u vary)"); sleep 0.2
    e2=$(curl -s -H 'X-Lang: en' "$(u vary)")
    R[$name,sem_vary]="en→'$e1', fr→'$f1', en→'$e2'; origin $(origin_count "$base/vary/$name")×"
    # PURGE (the origin answers 405 to it), then a GET: did either reach the origin?
    local c0 c1 c2
    curl -s -o /dev/null "$(u purge)"; sleep 0.2
    c0=$(origin_count "$base/purge/$name")
    s=$(curl -s -o /dev/null -X PURGE -w '%{http_code}' "$(u purge)")
    c1=$(origin_count "$base/purge/$name")
    curl -s -o /dev/null "$(u purge)"
    c2=$(origin_count "$base/purge/$name")
    [ "$c1" -gt "$c0" ] && s="$s from the origin" || s="$s from the proxy"
    [ "$c2" -gt "$c1" ] && s="$s, next GET refetched" || s="$s, next GET a hit"
    R[$name,sem_purge]=$s
}

start_origin
for name in "${PROXIES[@]}"; do
    say "measuring $name"
    start_proxy "$name"
    measure_streaming "$name"
    measure_hits "$name"
    sem "$name"
    measure_restart "$name"
    stop_proxy "$name"
done

{
    echo "Machine: $(nproc) cores, $(uname -r); $(nginx -v 2>&1); $(varnishd -V 2>&1 | head -1); wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}')."
    echo
    printf '| |'; for n in "${PROXIES[@]}"; do printf ' %s |' "$n"; done; echo
    printf '|---|'; for _ in "${PROXIES[@]}"; do printf -- '---|'; done; echo
    row() {
        local label=$1 key=$2
        printf '| %s |' "$label"
        for n in "${PROXIES[@]}"; do printf ' %s |' "${R[$n,$key]:-}"; done
        echo
    }
    row "herd (20 clients, 8 MiB over 2.5 s): origin requests" herd_origin
    row "herd: median first byte (ms)" herd_ttfb
    row "herd: median completion (ms)" herd_total
    row "herd: complete 200 responses of 20" herd_ok
    row "late joiner at 1.25 s" late
    row "Range 0-1023 at 0.5 s" range
    row "origin dies mid-body (3 clients: curl exit codes)" die
    row "1 MiB hits, 32 connections: requests/s" hit_rps
    row "1 MiB hits: CPU ms per 1000 hits" hit_cpu
    row "100 MiB object, 4 clients × 5 downloads: GB/s" big_gbs
    row "100 MiB object: proxy CPU ms per download" big_cpu
    row "1 MiB / 100 MiB objects: origin requests" hit_origin
    row "restart with the origin down" restart
    row "\`no-store\`" sem_nostore
    row "\`private\`" sem_private
    row "\`Set-Cookie\`" sem_cookie
    row "request with \`Authorization\`" sem_auth
    row "\`max-age=2\`, again after 3 s" sem_maxage
    row "\`HEAD\` after a GET" sem_head
    row "client \`If-None-Match\` matching" sem_inm
    row "\`Vary: X-Lang\`" sem_vary
    row "\`PURGE\`" sem_purge
} | tee "$OUT"

# The numeric rows as a chart: $W/chart.svg.
{
    printf 'metric'; for n in "${PROXIES[@]}"; do printf '\t%s' "$n"; done; echo
    tsv() {
        printf '%s' "$1"
        for n in "${PROXIES[@]}"; do printf '\t%s' "${R[$n,$2]:-}"; done
        echo
    }
    tsv "herd: median first byte, ms (lower is better)" herd_ttfb
    tsv "1 MiB hits: CPU ms per 1000 hits (lower is better)" hit_cpu
    tsv "1 MiB hits, 32 connections: requests/s" hit_rps
    tsv "100 MiB object, 4 clients: GB/s" big_gbs
} >"$W/results.tsv"
python3 "$HERE/chart.py" "$W/results.tsv" "$W/chart.svg" && say "chart: $W/chart.svg"
