#!/usr/bin/env bash
# Fill .carry/ (git-ignored) with what the offline GPU machine cannot download, before the
# device command that carries it:
#   .carry/site-packages/   Liger-Kernel, a pure-Python wheel (the CE peer of the sweep),
#                           unpacked: a py3-none-any wheel unzipped onto PYTHONPATH is installed
#   .carry/source.txt       the commit, how many source files differ from it, the source digest
# Usage: bash bench/gpu/vendor.sh [more pure-Python requirements, e.g. rich markdown-it-py mdurl pygments]
# LIGER_SPEC overrides the Liger requirement (default liger-kernel==0.8.5). gpucheck.py puts
# .carry/site-packages on the steps' PYTHONPATH when it exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DEST="$ROOT/.carry"
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
rm -rf "$DEST/site-packages"
mkdir -p "$DEST/site-packages"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "${LIGER_SPEC:-liger-kernel==0.8.5}" "$@"
for whl in "$WHEELS"/*.whl; do
  case "$(basename "$whl")" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
    *) echo "vendor.sh: $(basename "$whl") is not pure Python; it cannot travel to another machine" >&2; exit 1 ;;
  esac
  "$PY" -m zipfile -e "$whl" "$DEST/site-packages"
  echo "vendored $(basename "$whl")"
done
cd "$ROOT"
{
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "dirty $(git status --porcelain -- csrc python triton_kernels setup.py tests bench/gpu 2>/dev/null | wc -l | tr -d ' ')"
  echo "digest $("$PY" bench/gpu/gpucheck.py --digest)"
} > "$DEST/source.txt"
cat "$DEST/source.txt"
du -sh "$DEST"
