#!/usr/bin/env bash
# Single-process HDFS (MiniDFSCluster: 1 NameNode + 1 DataNode) on 127.0.0.1 for the HDFS tier tests.
#
#   scripts/minidfs.sh start    # prints ASYMCHECK_TEST_HDFS=hdfs://127.0.0.1:<port> on stdout
#   scripts/minidfs.sh status   # exit 0 when running
#   scripts/minidfs.sh stop
#   scripts/minidfs.sh kill     # SIGKILL the cluster process (a crash: nothing is flushed)
#   scripts/minidfs.sh resume   # start again on the file system of the last run, unformatted
#   scripts/minidfs.sh freeze   # SIGSTOP the cluster process (a hung NameNode + DataNode) ...
#   scripts/minidfs.sh thaw     # ... and SIGCONT it
#   scripts/minidfs.sh restart  # stop, then start (fresh)
#
#   export "$(scripts/minidfs.sh start)" && .venv/bin/pytest tests/tiers; scripts/minidfs.sh stop
#
# Needs java (11+) and, the first time, mvn to fetch the jars (.ci/hdfs/pom.xml -> .ci/hdfs/lib).
# `start` formats a fresh, empty file system; `resume` keeps the NameNode's metadata (fsimage +
# edit log) and the DataNode's blocks of the previous run, so what was committed before a stop
# or a kill is visible again. State lives in .minidfs/ (ignored by git).
#
# Environment:
#   MINIDFS_NN_PORT        NameNode RPC port            (default 9000)
#   MINIDFS_HTTP_PORT      NameNode HTTP/WebHDFS port   (default 9870)
#   MINIDFS_DIR            state folder                 (default <repo>/.minidfs)
#   MINIDFS_START_TIMEOUT  seconds to wait for start    (default 120)
#   MINIDFS_JAVA_OPTS      extra JVM options            (default -Xmx1g)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POM="$ROOT/.ci/hdfs/pom.xml"
LIB="$ROOT/.ci/hdfs/lib"
LOG4J="$ROOT/.ci/hdfs/log4j.properties"
STATE="${MINIDFS_DIR:-$ROOT/.minidfs}"
NN_PORT="${MINIDFS_NN_PORT:-9000}"
HTTP_PORT="${MINIDFS_HTTP_PORT:-9870}"
START_TIMEOUT="${MINIDFS_START_TIMEOUT:-120}"
JAVA_OPTS="${MINIDFS_JAVA_OPTS:--Xmx1g}"
HOST=127.0.0.1
PIDFILE="$STATE/pid"
LOG="$STATE/minidfs.log"
CONF="$STATE/conf/minidfs-site.xml"
MAIN=org.apache.hadoop.test.MiniDFSClusterManager

SERVICE=minidfs
# shellcheck source=scripts/_service.sh
source "$ROOT/scripts/_service.sh"

# Whether process $1 is alive and is our cluster (a dead, unreaped one has an empty cmdline).
service_alive() {
  kill -0 "$1" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q "$MAIN"
}

# Ready: WebHDFS answers, a DataNode is live, and the NameNode is out of safe mode (after a
# resume it stays read-only until the DataNode has reported its blocks).
webhdfs_ready() {
  curl -fsS --max-time 5 "http://$HOST:$HTTP_PORT/webhdfs/v1/?op=LISTSTATUS" 2>/dev/null \
    | grep -q '"FileStatuses"' || return 1
  curl -fsS --max-time 5 \
    "http://$HOST:$HTTP_PORT/jmx?qry=Hadoop:service=NameNode,name=FSNamesystemState" 2>/dev/null \
    | grep -Eq '"NumLiveDataNodes" *: *[1-9]' || return 1
  curl -fsS --max-time 5 \
    "http://$HOST:$HTTP_PORT/jmx?qry=Hadoop:service=NameNode,name=NameNodeInfo" 2>/dev/null \
    | grep -Eq '"Safemode" *: *""'
}

ensure_jars() {
  if compgen -G "$LIB/*.jar" >/dev/null; then
    return 0
  fi
  command -v mvn >/dev/null || die "no jars in $LIB and no mvn on PATH to fetch them"
  say "fetching jars with maven into $LIB (first start only) ..."
  local t0=$SECONDS
  mkdir -p "$STATE"
  if ! mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
      >"$STATE/maven.log" 2>&1; then
    rm -rf "$LIB"
    tail -n 40 "$STATE/maven.log" >&2
    die "maven could not fetch the MiniDFS jars (full output: $STATE/maven.log)"
  fi
  compgen -G "$LIB/*.jar" >/dev/null || die "maven ran but $LIB has no jars"
  say "jars fetched in $((SECONDS - t0)) s"
}

# start [resume]: launch the cluster; formats a fresh file system unless "resume" is given.
start() {
  local mode="${1:-fresh}" pid
  if pid="$(running_pid)"; then
    say "already running (pid $pid)"
    echo "ASYMCHECK_TEST_HDFS=hdfs://$HOST:$NN_PORT"
    return 0
  fi
  local format=-format
  if [[ "$mode" == resume ]]; then
    [[ -d "$STATE/work/data/dfs/name-0-1/current" ]] \
      || die "no file system of an earlier run in $STATE/work to resume (use start)"
    format=
  fi
  command -v java >/dev/null || die "java not found on PATH"
  command -v curl >/dev/null || die "curl not found on PATH"
  ensure_jars
  for port in "$NN_PORT" "$HTTP_PORT"; do
    port_busy "$port" && die "port $HOST:$port is already in use (set MINIDFS_NN_PORT / MINIDFS_HTTP_PORT)"
  done

  local t0=$SECONDS
  mkdir -p "$STATE"
  if [[ -n "$format" ]]; then
    rm -rf "$STATE/work"
    : >"$LOG"
  else
    echo "---- resumed $(date -Is)" >>"$LOG"
  fi
  rm -rf "$STATE/conf" "$PIDFILE"
  mkdir -p "$STATE/work" "$STATE/conf"

  # shellcheck disable=SC2086  # JAVA_OPTS is a list of options
  (
    cd "$STATE/work"
    exec nohup java $JAVA_OPTS \
      -Djava.net.preferIPv4Stack=true \
      -Dlog4j.configuration="file:$LOG4J" \
      -Dtest.build.data="$STATE/work/data" \
      -Dhadoop.tmp.dir="$STATE/work/tmp" \
      -cp "$LIB/*" "$MAIN" \
      $format -datanodes 1 -nnport "$NN_PORT" -httpport "$HTTP_PORT" \
      -D dfs.replication=1 \
      -D dfs.permissions.enabled=false \
      -D "hdfs.minidfs.basedir=$STATE/work/data/dfs" \
      -D "dfs.namenode.rpc-address=$HOST:$NN_PORT" \
      -D "dfs.namenode.http-address=$HOST:$HTTP_PORT" \
      -D "fs.defaultFS=hdfs://$HOST:$NN_PORT" \
      -writeConfig "$CONF"
  ) </dev/null >>"$LOG" 2>&1 &
  pid=$!
  echo "$pid" >"$PIDFILE"

  local deadline=$((SECONDS + START_TIMEOUT))
  until [[ -s "$CONF" ]] && webhdfs_ready; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      say "the cluster process exited during start"
      log_tail
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      say "not ready after ${START_TIMEOUT} s; stopping it"
      log_tail
      stop >/dev/null 2>&1 || true
      exit 1
    fi
    sleep 1
  done
  say "up in $((SECONDS - t0)) s (pid $pid, NameNode $HOST:$NN_PORT, http $HOST:$HTTP_PORT, log $LOG)"
  echo "ASYMCHECK_TEST_HDFS=hdfs://$HOST:$NN_PORT"
}

status() {
  local pid
  if pid="$(running_pid)"; then
    if webhdfs_ready; then
      say "running (pid $pid)"
    else
      say "process $pid alive but WebHDFS on $HOST:$HTTP_PORT does not answer"
    fi
    echo "ASYMCHECK_TEST_HDFS=hdfs://$HOST:$NN_PORT"
    return 0
  fi
  say "stopped"
  return 3
}

case "${1:-}" in
  start) start ;;
  resume) start resume ;;
  stop) stop ;;
  kill) kill_now ;;
  freeze) signal_service STOP ;;
  thaw) signal_service CONT ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|kill|resume|freeze|thaw|restart" >&2; exit 2 ;;
esac
