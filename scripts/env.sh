# Sourced by the other scripts: a project virtualenv (.venv) with everything installed.
# PYTHON picks the interpreter (default python3, >= 3.10).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.asymcheck-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "installing asymcheck and its dependencies into .venv (the first time takes minutes) ..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
