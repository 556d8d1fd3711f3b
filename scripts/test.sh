#!/usr/bin/env bash
# The test command: install, lint and type-check, start the MiniDFS cluster, run pytest, stop it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k hdfs). In CI (CI=true) a cluster that
# cannot start is a failure; elsewhere, without Java or Maven, the HDFS tests skip with a reason.
source "$(dirname "$0")/env.sh"

ruff check .
mypy

if command -v java >/dev/null && { command -v mvn >/dev/null || compgen -G ".ci/hdfs/lib/*.jar" >/dev/null; }; then
  trap 'bash scripts/minidfs.sh stop >&2 || true' EXIT
  hdfs_env="$(bash scripts/minidfs.sh start)"
  export "${hdfs_env?}"
elif [[ "${CI:-}" == "true" ]]; then
  echo "CI needs java and mvn to run the MiniDFS cluster for the HDFS tests" >&2
  exit 1
else
  echo "no java/mvn here: HDFS tests will be skipped" >&2
fi

python -m pytest "$@"
