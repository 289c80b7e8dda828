#!/usr/bin/env bash
# Export slicer_extension/ as the root of its own git repository (the Slicer Extensions Index builds
# extensions from a repository root). The project keeps the source here; run this to refresh the
# extension's repository:
#
#   scripts/export_slicer_extension.sh <target folder>
#
# The target is either a folder that does not exist yet or is empty, or a previous export made by this
# script (it holds the manifest .hybrid-ct-export listing the files it wrote). Anything else is refused:
# the script never deletes a folder or a file it did not write. Refreshing a previous export removes
# only the files listed in its manifest (one by one, never recursively) and the folders that became
# empty, then copies the extension folder's files (no __pycache__, no build output), makes a git
# repository if there is none, and one commit with the files as they are now.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 <target folder>" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/slicer_extension"
manifest_name=".hybrid-ct-export"
target="$1"

if [ -e "$target" ] && [ ! -d "$target" ]; then
  echo "refused: $target exists and is not a folder" >&2
  exit 2
fi
created=0
if [ ! -e "$target" ]; then
  mkdir -p "$target"
  created=1
fi
target="$(cd "$target" && pwd -P)"
src_real="$(cd "$src" && pwd -P)"
here_real="$(cd "$here" && pwd -P)"
refuse() {
  echo "refused: $1" >&2
  [ "$created" = 1 ] && rmdir "$target" 2>/dev/null
  exit 2
}
case "$target/" in
  "$src_real"/*|"$here_real"/*) refuse "the target $target is inside the project ($here_real)" ;;
esac
case "$here_real/" in
  "$target"/*) refuse "the target $target contains the project ($here_real): give a new or empty folder" ;;
esac
if [ -n "$(ls -A "$target")" ] && [ ! -f "$target/$manifest_name" ]; then
  refuse "$target is not empty and is not an export made by this script (no $manifest_name): give a new or empty folder"
fi

# a previous export: remove exactly the files it wrote (listed in its manifest), then empty folders
if [ -f "$target/$manifest_name" ]; then
  while IFS= read -r f; do
    case "$f" in
      ""|/*|..|../*|*/../*|*/..|.git|.git/*) continue ;;  # only plain relative paths inside the target
    esac
    if [ -f "$target/$f" ] && [ ! -L "$target/$f" ]; then rm -f -- "$target/$f"; fi
  done < "$target/$manifest_name"
  while IFS= read -r f; do
    d="$(dirname -- "$f")"
    case "$d" in ""|.|/*|..|../*|*/../*|*/..|.git|.git/*) continue ;; esac
    while [ "$d" != "." ] && rmdir -- "$target/$d" 2>/dev/null; do d="$(dirname -- "$d")"; done
  done < "$target/$manifest_name"
fi

# copy everything but caches and build trees, and write the new manifest
tmp_manifest="$(mktemp)"
trap 'rm -f "$tmp_manifest"' EXIT
(cd "$src" && find . -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path './build/*' -print0) \
  | while IFS= read -r -d '' f; do
      f="${f#./}"
      mkdir -p "$target/$(dirname "$f")"
      cp -p "$src/$f" "$target/$f"
      printf '%s\n' "$f" >> "$tmp_manifest"
    done
printf '__pycache__/\n*.pyc\nbuild/\n' > "$target/.gitignore"
printf '.gitignore\n' >> "$tmp_manifest"
sort "$tmp_manifest" > "$target/$manifest_name"

cd "$target"
[ -d .git ] || git init -q
git add -A
if ! git diff --cached --quiet; then
  rev="$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  git -c user.name="${GIT_AUTHOR_NAME:-Hybrid CT export}" -c user.email="${GIT_AUTHOR_EMAIL:-hybrid-ct@localhost}" \
    commit -q -m "Hybrid CT Slicer extension exported from the project at $rev"
fi
echo "exported $src -> $target"
