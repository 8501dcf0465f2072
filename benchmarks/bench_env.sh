# Shared by the benchmark shell scripts: repository root as working directory, OUT_DIR ($1, default
# benchmarks/results), the Python to use, and run LIMIT MODULE ARGS... (a time limit per benchmark, so
# one failure does not stop the others).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-benchmarks/results}
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
run() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$py" -m "$@" || echo "!! $1 exited with $?"; }
