#!/usr/bin/env bash
# Export slicer_extension/ as the root of its own git repository (the Slicer Extensions Index builds
# extensions from a repository root). The project keeps the source here; run this to refresh the
# extension's repository:
#
#   scripts/export_slicer_extension.sh <target folder>
#
# The target gets the extension folder's tracked-or-present files (no __pycache__, no build output),
# a git repository if it has none, and one commit with the files as they are now.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 <target folder>" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/slicer_extension"
target="$1"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
case "$target/" in
  "$src"/*|"$here/") echo "the target must be outside the project's extension folder" >&2; exit 2 ;;
esac

# copy everything but caches and build trees; files deleted here are deleted there (not .git)
find "$target" -mindepth 1 -maxdepth 1 ! -name .git -exec rm -rf {} +
(cd "$src" && find . -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path './build/*' -print0 \
  | while IFS= read -r -d '' f; do mkdir -p "$target/$(dirname "$f")"; cp -p "$f" "$target/$f"; done)
printf '__pycache__/\n*.pyc\nbuild/\n' > "$target/.gitignore"

cd "$target"
[ -d .git ] || git init -q
git add -A
if ! git diff --cached --quiet; then
  rev="$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  git -c user.name="${GIT_AUTHOR_NAME:-Hybrid CT export}" -c user.email="${GIT_AUTHOR_EMAIL:-hybrid-ct@localhost}" \
    commit -q -m "Hybrid CT Slicer extension exported from the project at $rev"
fi
echo "exported $src -> $target"
