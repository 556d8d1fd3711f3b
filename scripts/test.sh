#!/usr/bin/env bash
# The test command: install, lint and type-check, start the MiniDFS cluster and the SeaweedFS S3
# server, run pytest, stop them. Extra arguments go to pytest (e.g. scripts/test.sh -k hdfs). In
# CI (CI=true) a cluster or server that cannot be built or started is a failure; elsewhere,
# without Java or Maven the HDFS tests skip with a reason, and without Go the S3 tests do.
source "$(dirname "$0")/env.sh"

ruff check .
mypy

services=()
stop_services() {
  local s
  for s in ${services[@]+"${services[@]}"}; do
    bash "scripts/$s.sh" stop >&2 || true
  done
}
trap stop_services EXIT

if command -v java >/dev/null && { command -v mvn >/dev/null || compgen -G ".ci/hdfs/lib/*.jar" >/dev/null; }; then
  services+=(minidfs)
  hdfs_env="$(bash scripts/minidfs.sh start)"
  export "${hdfs_env?}"
elif [[ "${CI:-}" == "true" ]]; then
  echo "CI needs java and mvn to run the MiniDFS cluster for the HDFS tests" >&2
  exit 1
else
  echo "no java/mvn here: HDFS tests will be skipped" >&2
fi

# SeaweedFS is built from source (Go) the first time; the binary is cached in .ci/seaweedfs/.
if command -v go >/dev/null || compgen -G ".ci/seaweedfs/bin/weed-*" >/dev/null; then
  services+=(seaweedfs)
  if ! s3_env="$(bash scripts/seaweedfs.sh start)"; then
    echo "the SeaweedFS S3 server could not be built or started (see the lines above)" >&2
    exit 1
  fi
  while IFS= read -r line; do
    [[ -n "$line" ]] && export "${line?}"
  done <<<"$s3_env"
elif [[ "${CI:-}" == "true" ]]; then
  echo "CI needs go to build the SeaweedFS S3 server for the S3 tests" >&2
  exit 1
else
  echo "no go here: S3 tests will be skipped" >&2
fi

python -m pytest "$@"
