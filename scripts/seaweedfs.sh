#!/usr/bin/env bash
# Single-process SeaweedFS (master + volume + filer + S3 gateway) on 127.0.0.1 for the S3 tier tests.
#
#   scripts/seaweedfs.sh build    # build bin/weed from source (Go), once per pinned version
#   scripts/seaweedfs.sh start    # fresh, empty store; prints ASYMCHECK_TEST_S3=... and the
#                                 # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY lines on stdout
#   scripts/seaweedfs.sh env      # the same lines as `export KEY='VALUE'`, for eval
#   scripts/seaweedfs.sh status   # exit 0 when running
#   scripts/seaweedfs.sh stop     # SIGTERM, then SIGKILL when it takes too long
#   scripts/seaweedfs.sh kill     # SIGKILL (a crash)
#   scripts/seaweedfs.sh resume   # start again on the data of the last run
#   scripts/seaweedfs.sh freeze   # SIGSTOP the server (a hung store: connections open, no answers) ...
#   scripts/seaweedfs.sh thaw     # ... and SIGCONT it
#   scripts/seaweedfs.sh restart  # stop, then start (fresh)
#
#   scripts/seaweedfs.sh start >/dev/null && eval "$(scripts/seaweedfs.sh env)"
#   .venv/bin/pytest -m s3; scripts/seaweedfs.sh stop
#
# Needs go (the version SeaweedFS's go.mod asks for) and, the first time, the Go module proxy:
# `go install` refuses the module (its go.mod has replace directives), so `build` downloads it
# with `go mod download`, copies it to a writable folder and runs `go build ./weed` there. The
# first build takes minutes; the binary is cached in .ci/seaweedfs/bin/ under the pinned
# version and rebuilt only when SEAWEEDFS_VERSION changes. State lives in .seaweedfs/ (ignored
# by git); the bucket is created by `start` with the test credentials.
#
# Environment:
#   SEAWEEDFS_VERSION        module version to build          (default: the pinned one below)
#   SEAWEEDFS_S3_PORT        S3 gateway port (its gRPC port: +10000)        (default 18333)
#   SEAWEEDFS_PORT_BASE      master/volume/filer ports: base, base+1, base+2, their gRPC
#                            ports +10000                                   (default 18330)
#   SEAWEEDFS_DIR            state folder                     (default <repo>/.seaweedfs)
#   SEAWEEDFS_BUCKET         bucket created by start          (default asymcheck-test)
#   SEAWEEDFS_START_TIMEOUT  seconds to wait for start        (default 90)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
MODULE=github.com/seaweedfs/seaweedfs
CACHE="$ROOT/.ci/seaweedfs"
BIN="$CACHE/bin/weed-$VERSION"
STATE="${SEAWEEDFS_DIR:-$ROOT/.seaweedfs}"
S3_PORT="${SEAWEEDFS_S3_PORT:-18333}"
PORT_BASE="${SEAWEEDFS_PORT_BASE:-18330}"
MASTER_PORT=$PORT_BASE
VOLUME_PORT=$((PORT_BASE + 1))
FILER_PORT=$((PORT_BASE + 2))
BUCKET="${SEAWEEDFS_BUCKET:-asymcheck-test}"
START_TIMEOUT="${SEAWEEDFS_START_TIMEOUT:-90}"
HOST=127.0.0.1
PIDFILE="$STATE/pid"
LOG="$STATE/weed.log"
DATA="$STATE/data"
# Test-only credentials of the single identity the server knows.
ACCESS_KEY=asymcheck-test-access
SECRET_KEY=asymcheck-test-secret-5b1f9c

SERVICE=seaweedfs
# shellcheck source=scripts/_service.sh
source "$ROOT/scripts/_service.sh"

service_alive() {
  kill -0 "$1" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q "weed.* server"
}

env_lines() {
  echo "ASYMCHECK_TEST_S3=s3://$BUCKET/asymcheck?endpoint_override=$HOST:$S3_PORT&scheme=http&region=us-east-1"
  echo "AWS_ACCESS_KEY_ID=$ACCESS_KEY"
  echo "AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
}

export_lines() {
  local line
  env_lines | while IFS= read -r line; do
    echo "export ${line%%=*}='${line#*=}'"
  done
}

build() {
  if [[ -x "$BIN" ]]; then
    return 0
  fi
  command -v go >/dev/null || die "go not found on PATH: cannot build SeaweedFS $VERSION"
  mkdir -p "$CACHE/bin"
  local t0=$SECONDS buildlog="$CACHE/build.log" dir src
  say "building SeaweedFS $VERSION from source (the first build takes minutes; log $buildlog) ..."
  if ! dir="$(go mod download -json "$MODULE@$VERSION" 2>>"$buildlog" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')" || [[ -z "$dir" ]]; then
    tail -n 20 "$buildlog" >&2 || true
    die "go mod download $MODULE@$VERSION failed (is the Go module proxy reachable?)"
  fi
  src="$CACHE/src-$VERSION"
  rm -rf "$src"
  cp -r "$dir" "$src"
  chmod -R u+w "$src"
  if ! (cd "$src" && go build -o "$BIN.tmp" ./weed) >>"$buildlog" 2>&1; then
    tail -n 40 "$buildlog" >&2 || true
    rm -f "$BIN.tmp"
    die "go build of SeaweedFS failed (full output: $buildlog)"
  fi
  mv "$BIN.tmp" "$BIN"
  rm -rf "$src"
  # Binaries of other versions are stale now.
  find "$CACHE/bin" -name 'weed-*' ! -name "weed-$VERSION" -delete 2>/dev/null || true
  say "built in $((SECONDS - t0)) s: $BIN"
}

s3_config() {
  cat >"$STATE/s3.json" <<EOF
{
  "identities": [
    {
      "name": "asymcheck-test",
      "credentials": [{"accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY"}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
}

# Signed requests with the test credentials: ListBuckets when $1 is empty; "create B":
# create bucket B; "probe B": write and delete an object in B (volumes are ready for writes).
s3_call() {
  local py="$ROOT/.venv/bin/python"
  [[ -x "$py" ]] || py=python3
  "$py" - "$HOST:$S3_PORT" "$ACCESS_KEY" "$SECRET_KEY" "${1:-}" "${2:-}" <<'EOF'
import sys

from pyarrow import fs

endpoint, access, secret, what, bucket = sys.argv[1:6]
s3 = fs.S3FileSystem(access_key=access, secret_key=secret, endpoint_override=endpoint,
                     scheme="http", region="us-east-1", connect_timeout=2, request_timeout=5,
                     retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1),
                     allow_bucket_creation=True)
if what == "create":
    s3.create_dir(bucket)
elif what == "probe":
    with s3.open_output_stream(f"{bucket}/.seaweedfs-ready") as out:
        out.write(b"ready")
    s3.delete_file(f"{bucket}/.seaweedfs-ready")
else:
    s3.get_file_info(fs.FileSelector("", recursive=False))
EOF
}

# start [resume]: launch the server; wipes the data of the last run unless "resume" is given.
start() {
  local mode="${1:-fresh}" pid
  if pid="$(running_pid)"; then
    say "already running (pid $pid)"
    env_lines
    return 0
  fi
  if [[ "$mode" == resume ]]; then
    [[ -d "$DATA" ]] || die "no data of an earlier run in $DATA to resume (use start)"
  fi
  build
  for port in "$S3_PORT" "$MASTER_PORT" "$VOLUME_PORT" "$FILER_PORT" $((S3_PORT + 10000)) \
      $((MASTER_PORT + 10000)) $((VOLUME_PORT + 10000)) $((FILER_PORT + 10000)); do
    # a server killed a moment ago may still hold its ports for a little while
    for _ in $(seq 1 20); do
      port_busy "$port" || break
      sleep 0.25
    done
    port_busy "$port" && die "port $HOST:$port is already in use (set SEAWEEDFS_S3_PORT / SEAWEEDFS_PORT_BASE)"
  done

  local t0=$SECONDS
  mkdir -p "$STATE"
  if [[ "$mode" != resume ]]; then
    rm -rf "$DATA"
    : >"$LOG"
  else
    echo "---- resumed $(date -Is)" >>"$LOG"
  fi
  rm -f "$PIDFILE"
  mkdir -p "$DATA"
  s3_config
  (
    cd "$STATE"
    exec nohup "$BIN" -logtostderr=true server \
      -ip="$HOST" -ip.bind="$HOST" -dir="$DATA" \
      -master.port="$MASTER_PORT" -volume.port="$VOLUME_PORT" \
      -filer -filer.port="$FILER_PORT" \
      -s3 -s3.port="$S3_PORT" -s3.config="$STATE/s3.json" \
      -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -master.electionTimeout=1s \
      -master.volumeSizeLimitMB=256 -volume.max=0
  ) </dev/null >>"$LOG" 2>&1 &
  pid=$!
  echo "$pid" >"$PIDFILE"

  local deadline=$((SECONDS + START_TIMEOUT))
  until port_busy "$S3_PORT" && s3_call "" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      say "the server process exited during start"
      log_tail
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      say "not ready after ${START_TIMEOUT} s; stopping it"
      log_tail
      stop >/dev/null 2>&1 || true
      exit 1
    fi
    sleep 0.5
  done
  if [[ "$mode" != resume ]]; then
    local err
    if ! err="$(s3_call create "$BUCKET" 2>&1)"; then
      say "could not create bucket $BUCKET: $err"
      stop >/dev/null 2>&1 || true
      exit 1
    fi
  fi
  # The gateway answers before the volume servers take writes (after a resume, for seconds).
  until s3_call probe "$BUCKET" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      say "no write went through after ${START_TIMEOUT} s; stopping it"
      log_tail
      stop >/dev/null 2>&1 || true
      exit 1
    fi
    sleep 0.5
  done
  say "up in $((SECONDS - t0)) s (pid $pid, S3 $HOST:$S3_PORT, bucket $BUCKET, log $LOG)"
  env_lines
}

status() {
  local pid
  if pid="$(running_pid)"; then
    if s3_call "" 2>/dev/null; then
      say "running (pid $pid)"
    else
      say "process $pid alive but S3 on $HOST:$S3_PORT does not answer"
    fi
    env_lines
    return 0
  fi
  say "stopped"
  return 3
}

case "${1:-}" in
  build) build ;;
  start) start ;;
  resume) start resume ;;
  stop) stop ;;
  kill) kill_now ;;
  freeze) signal_service STOP ;;
  thaw) signal_service CONT ;;
  status) status ;;
  env) running_pid >/dev/null || die "not running (scripts/seaweedfs.sh start)"; export_lines ;;
  restart) stop; start ;;
  *) echo "usage: $0 build|start|stop|status|env|kill|resume|freeze|thaw|restart" >&2; exit 2 ;;
esac
