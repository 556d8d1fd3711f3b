# The lifecycle both test services share (sourced by minidfs.sh and seaweedfs.sh).
# The sourcing script sets SERVICE (a name for messages), HOST, PIDFILE and LOG, and defines
# `service_alive PID`: whether PID is alive and is its server (pids get reused).

say() { echo "$SERVICE: $*" >&2; }
die() { say "$*"; exit 1; }

# The pid from the pid file, only if that process is still the server.
running_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  service_alive "$pid" || return 1
  echo "$pid"
}

port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

log_tail() {
  if [[ -f "$LOG" ]]; then
    say "last lines of $LOG:"
    grep -v '^\s*$' "$LOG" | tail -n 40 >&2 || true
  fi
}

# SIGTERM, and SIGKILL after 30 s (a frozen server is thawed first: it cannot handle SIGTERM).
stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    say "not running"
    return 0
  fi
  kill -CONT "$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    service_alive "$pid" || break
    sleep 0.5
  done
  if service_alive "$pid"; then
    say "still alive after 30 s; sending SIGKILL to $pid"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$PIDFILE"
  say "stopped (pid $pid)"
}

# A crash: SIGKILL, nothing is flushed or shut down.
kill_now() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    say "not running"
    return 0
  fi
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    service_alive "$pid" || break
    sleep 0.05
  done
  service_alive "$pid" && die "process $pid survived SIGKILL"
  rm -f "$PIDFILE"
  say "killed (pid $pid)"
}

# freeze|thaw: SIGSTOP/SIGCONT, a server that hangs: connections open, no answers.
signal_service() {
  local pid
  pid="$(running_pid)" || die "not running"
  kill "-$1" "$pid"
  say "sent SIG$1 to $pid"
}
