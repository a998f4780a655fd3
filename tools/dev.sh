#!/usr/bin/env bash
# tools/dev.sh - the developer entry point behind the README's two commands.
#
#   tools/dev.sh run    install what is missing, build, run capsule-engine on localhost
#   tools/dev.sh test   install what is missing, build, run the whole test suite
#                       (a release build with -Werror, then an ASan+UBSan build of the C tests,
#                       then the libFuzzer targets for a bounded time, then every benchmark once
#                       with --quick so none of them rots)
#   tools/dev.sh deps | build | asan | fuzz   the single steps
#   (fuzz: CAPSULE_FUZZ_SECONDS per target, default 25; 4 targets)
#
# Idempotent: packages already installed are not installed again; builds are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
JOBS=$(nproc)

# Debian 12 packages the build, the tests and the benchmarks need.
DEBS=(build-essential cmake ninja-build pkg-config git
      liblmdb-dev lmdb-utils libuv1-dev libtpl-dev libxxhash-dev
      libpython3.11-dev python3.11 python3.11-venv
      libjansson-dev libwslay-dev libhttp-parser-dev libssl-dev libsqlite3-dev
      clang-format curl procps python3-websockets python3-ipykernel python3-jupyter-client
      python3-numpy   # numpy: the seed pool example warms workers with "import numpy as np"
      python3-matplotlib   # bench/run's plots (latency CDF, recovery curve)
      clang-14 libclang-rt-14-dev)  # the libFuzzer targets (tools/dev.sh fuzz)

log() { printf '== %s\n' "$*" >&2; }

need_sudo() { if [ "$(id -u)" -ne 0 ]; then echo sudo; fi; }

deps() {
    local missing=()
    for p in "${DEBS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        $(need_sudo) apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $(need_sudo) apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

build() {
    log "building (build/)"
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    cmake --build build -j "$JOBS"
}

asan() {
    log "building with ASan+UBSan (build-asan/)"
    cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCAPSULE_SANITIZE=ON >/dev/null
    cmake --build build-asan -j "$JOBS"
}

run_tests() {
    log "tests (release build)"
    (cd build && ctest --output-on-failure -j "$JOBS" --timeout 600)
    log "tests (ASan+UBSan build)"
    (cd build-asan && CAPSULE_SANITIZED=1 ctest --output-on-failure -j "$JOBS" --timeout 900 -LE nosan)
}

# The libFuzzer targets over capsule_http's parsers (tests/server/fuzz/), each for a bounded time
# from the seed corpus in the repository; new inputs go to build-fuzz/corpus/, a crash to
# build-fuzz/crashes/ (fix it, then add the input to tests/server/fuzz/corpus/<target>/).
fuzz() {
    local secs=${CAPSULE_FUZZ_SECONDS:-25} t n
    log "libFuzzer targets, ${secs} s each (build-fuzz/, clang-14)"
    CC=clang-14 cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCAPSULE_FUZZ=ON >/dev/null
    cmake --build build-fuzz -j "$JOBS"
    mkdir -p build-fuzz/crashes
    for t in http ws json wsmsg; do
        mkdir -p "build-fuzz/corpus/$t"
        if ! build-fuzz/bin/fuzz_$t -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
            -max_len=8192 -print_final_stats=1 -artifact_prefix="build-fuzz/crashes/$t-" \
            "build-fuzz/corpus/$t" "tests/server/fuzz/corpus/$t" >"build-fuzz/fuzz_$t.log" 2>&1; then
            tail -n 60 "build-fuzz/fuzz_$t.log" >&2
            log "fuzz_$t failed: see build-fuzz/fuzz_$t.log and build-fuzz/crashes/"
            return 1
        fi
        n=$(sed -n 's/^stat::number_of_executed_units: *//p' "build-fuzz/fuzz_$t.log")
        log "fuzz_$t: ${n:-?} inputs in ${secs} s, no crash"
    done
}

cmd=${1:-}
case "$cmd" in
deps) deps ;;
build) deps; build ;;
asan) deps; asan ;;
fuzz) deps; fuzz ;;
test)
    deps
    build
    asan
    fuzz
    log "benchmarks, --quick (kept working; figures not judged here)"
    bench/run --quick --no-build
    run_tests
    ;;
run)
    deps
    build
    data=${CAPSULE_DATA_DIR:-$ROOT/build/data}
    if [ -x build/bin/capsule-engine ]; then
        log "capsule-engine on 127.0.0.1, data in $data"
        exec build/bin/capsule-engine --data-dir "$data" "${@:2}"
    fi
    echo "build/bin/capsule-engine is missing after the build (see its output above)." >&2
    exit 1
    ;;
*)
    echo "usage: tools/dev.sh run|test|deps|build|asan|fuzz" >&2
    exit 2
    ;;
esac
