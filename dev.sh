#!/usr/bin/env bash
# Developer entry point. On a fresh machine each command installs what it
# needs first (Debian packages, the tansu test broker), so nothing has to be
# set up by hand.
#
#   ./dev.sh quickstart [ARGS]   build (release) and run `ndc quickstart`
#   ./dev.sh test                set up, then run the whole test suite
#   ./dev.sh lint                rustfmt --check and clippy -D warnings
#   ./dev.sh ci                  lint + test (what .ci/run calls)
#   ./dev.sh bench [ARGS]        load test (release), see docs/performance.md
#   ./dev.sh bench-ops [ARGS]    decode and apply stages alone (release); with
#                                --callgrind [EVENTS]: instructions per event
#                                (decode, apply, and the whole node on a file)
#   ./dev.sh soak                long crash/resume and cluster failover runs (not in CI)
#   ./dev.sh fuzz [SECONDS]      fuzz the Debezium decoder (nightly; first build ~40 min)
#   ./dev.sh setup               only install prerequisites
#
# Environment: NDC_CACHE (default ~/.cache/ndc) holds the test broker;
# CARGO_TARGET_DIR is honoured as usual.
set -euo pipefail

cd "$(dirname "$0")"
NDC_CACHE="${NDC_CACHE:-$HOME/.cache/ndc}"
TANSU_VERSION=0.6.0
# Built with SlateDB storage too: the tests that trim change logs need
# DeleteRecords, which tansu's default (memory) storage does not implement.
TANSU_ROOT="$NDC_CACHE/tansu-$TANSU_VERSION-slatedb"
export NDC_TANSU_BIN="$TANSU_ROOT/bin/tansu"
DEB_PACKAGES=(build-essential pkg-config cmake libclang-dev protobuf-compiler libcurl4-openssl-dev zlib1g-dev libssl-dev libsasl2-dev openssl stunnel4)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_sudo() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; exit 1; fi
}

# Installs whichever of the given Debian packages are missing.
install_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    need_sudo apt-get update -qq
    need_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

setup_packages() {
  install_packages "${DEB_PACKAGES[@]}"
  if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (rustup) first" >&2; exit 1
  fi
}

setup_broker() {
  if [ ! -x "$NDC_TANSU_BIN" ]; then
    say "installing the test broker tansu $TANSU_VERSION into $TANSU_ROOT (about 14 minutes on 2 cores, once)"
    mkdir -p "$NDC_CACHE"
    CARGO_TARGET_DIR="$NDC_CACHE/tansu-build" cargo install tansu --version "$TANSU_VERSION" \
      --locked --features dynostore,tansu-broker/slatedb --root "$TANSU_ROOT" --quiet
    rm -rf "$NDC_CACHE/tansu-build"
  fi
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup)
    setup_packages
    setup_broker
    ;;
  quickstart)
    setup_packages
    say "building ndc (release; the first build compiles RocksDB and librdkafka, 15-27 minutes on 2 cores)"
    cargo build --release --locked -p ndc-node --bin ndc
    exec "${CARGO_TARGET_DIR:-target}/release/ndc" quickstart "$@"
    ;;
  test)
    setup_packages
    setup_broker
    say "running the test suite (real tansu broker on loopback, real RocksDB)"
    cargo test --workspace --locked --no-fail-fast "$@"
    ;;
  lint)
    setup_packages
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings
    ;;
  ci)
    "$0" lint
    "$0" test
    ;;
  bench)
    setup_packages
    setup_broker
    # The load test starts `ndc node` processes: build the binary too.
    cargo build --release --locked -p ndc-node -p ndc-loadtest
    exec "${CARGO_TARGET_DIR:-target}/release/ndc-loadtest" "$@"
    ;;
  bench-ops)
    setup_packages
    say "building the operator bench (release)"
    bin=$(cargo bench --locked -q --no-run -p ndc-loadtest --bench operators --message-format=json |
      grep '"kind":\["bench"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    [ -x "$bin" ] || { echo "cannot find the operator bench's binary" >&2; exit 1; }
    if [ "${1:-}" != --callgrind ]; then
      exec "$bin" "$@"
    fi
    # Instructions do not depend on how fast the machine is this hour: each
    # stage's count is the difference between runs that stop before and
    # after it, over the same generated events.
    events="${2:-50000}"
    command -v valgrind >/dev/null || install_packages valgrind
    out=$(mktemp -d)
    say "counting instructions under callgrind: $events events, $((events / 4)) keys (a few minutes)"
    pids=()
    for stage in none decode all; do
      valgrind --tool=callgrind --callgrind-out-file="$out/$stage.callgrind" "$bin" \
        --events "$events" --keys $((events / 4)) --stage "$stage" >"$out/$stage.log" 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do
      wait "$pid" || { echo "a callgrind run failed; see $out" >&2; exit 1; }
    done
    ir() { sed -n 's/^totals: //p' "$out/$1.callgrind"; }
    none=$(ir none) decode=$(ir decode) all=$(ir all)
    printf 'decode   %8d instructions per event\n' $(((decode - none) / events))
    printf 'apply    %8d instructions per event (RocksDB threads included)\n' $(((all - decode) / events))
    # The whole node on a file of as many events: every instruction of the
    # process, start and stop included (~36M, under 1,000 per event here).
    cargo build --release --locked -q -p ndc-node
    ndc="${CARGO_TARGET_DIR:-target}/release/ndc"
    "$ndc" generate --people $((events / 4)) --updates $((events - events / 4)) \
      -o "$out/export.ndjson" >/dev/null 2>&1
    cat >"$out/node.yaml" <<YAML
node: { id: callgrind, data_dir: $out/data, grpc_listen: "127.0.0.1:0", http_listen: "127.0.0.1:0" }
tls: { insecure: true }
views:
  - name: population.citizens
    key_columns: [person_id]
    sources: [ { file: { path: $out/export.ndjson } } ]
YAML
    valgrind --tool=callgrind --callgrind-out-file="$out/node.callgrind" "$ndc" node \
      --config "$out/node.yaml" >"$out/node.log" 2>&1 &
    node=$!
    committed=0
    for _ in $(seq 1 900); do
      sleep 2
      kill -0 "$node" 2>/dev/null || { echo "the node stopped; see $out/node.log" >&2; exit 1; }
      addr=$(sed -n 's/.*"grpc":"\([^"]*\)".*/\1/p' "$out/data/node.addr" 2>/dev/null || true)
      [ -n "$addr" ] || continue
      committed=$("$ndc" views --addr "$addr" 2>/dev/null |
        sed -n 's/.*"committed_seq":\([0-9]*\).*/\1/p' | head -1)
      [ "${committed:-0}" -ge "$events" ] && break
    done
    kill -TERM "$node"
    wait "$node" || true
    [ "${committed:-0}" -ge "$events" ] ||
      { echo "the node committed ${committed:-0} of $events events" >&2; exit 1; }
    printf 'node     %8d instructions per event (file source, whole process)\n' $(($(ir node) / events))
    rm -rf "$out"
    ;;
  soak)
    setup_packages
    setup_broker
    NDC_SOAK=1 cargo test --release --locked -p ndc-node --test crash --test cluster -- --nocapture "$@"
    ;;
  fuzz)
    setup_packages
    if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
      say "installing the nightly toolchain (cargo fuzz needs it)"
      rustup toolchain install nightly --profile minimal
    fi
    if [ ! -x "$NDC_CACHE/cargo-fuzz/bin/cargo-fuzz" ]; then
      say "installing cargo-fuzz into $NDC_CACHE/cargo-fuzz"
      cargo install cargo-fuzz --locked --root "$NDC_CACHE/cargo-fuzz" --quiet
    fi
    cd operators
    PATH="$NDC_CACHE/cargo-fuzz/bin:$PATH" exec cargo +nightly fuzz run decode -- \
      -max_total_time="${1:-300}" -max_len=4096
    ;;
  help|-h|--help)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    echo "unknown command: $cmd (try ./dev.sh help)" >&2
    exit 2
    ;;
esac
