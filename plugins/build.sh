#!/usr/bin/env bash
# Builds every plugin under this folder (a folder with plugin.yaml and
# assembly/index.ts) into its release.wasm. Safe to run again: npm ci is
# skipped while node_modules matches package-lock.json, and asc output is
# deterministic, so an unchanged source gives a byte-identical release.wasm.
#
#   bash plugins/build.sh            build all plugins
#   bash plugins/build.sh rewrite    build only the named plugins
#   bash plugins/build.sh --check    build to a temp dir and fail if any
#                                    committed release.wasm is stale (CI)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

check=0
names=()
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) names+=("${arg%/}") ;;
  esac
done
if [ ${#names[@]} -eq 0 ]; then
  for d in */; do
    d="${d%/}"
    [ -f "$d/plugin.yaml" ] && [ -f "$d/assembly/index.ts" ] && names+=("$d")
  done
fi

[ ${#names[@]} -gt 0 ] || { echo "build.sh: no plugins found in $here" >&2; exit 1; }

command -v npm >/dev/null || { echo "build.sh: npm not found (node >= 16 is needed)" >&2; exit 1; }

# The stamp is a copy of the lock file taken after a good install; while it
# matches, the network-touching npm ci is skipped. npm ci wipes
# node_modules first, so a failed install never leaves a stale stamp.
stamp=node_modules/.installed-package-lock.json
if ! cmp -s package-lock.json "$stamp" 2>/dev/null; then
  npm ci --include=dev --no-audit --no-fund --loglevel=error
  cp package-lock.json "$stamp"
fi

asc="$here/node_modules/.bin/asc"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for name in "${names[@]}"; do
  [ -f "$name/assembly/index.ts" ] || { echo "build.sh: no plugin named $name" >&2; exit 1; }
done

# Plugins compile independently; run them side by side (asc is single-threaded
# for most of its time). asc prints an upstream AS201 warning from its own
# std library on every build, so its log is shown only when it fails.
pids=()
for name in "${names[@]}"; do
  "$asc" "$name/assembly/index.ts" --config asconfig.json -b "$tmp/$name.wasm" \
    >"$tmp/$name.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!names[@]}"; do
  if ! wait "${pids[$i]}"; then
    cat "$tmp/${names[$i]}.log" >&2
    echo "build.sh: ${names[$i]} failed to build" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] || exit 1

status=0
for name in "${names[@]}"; do
  out="$tmp/$name.wasm"
  if [ "$check" -eq 1 ]; then
    if cmp -s "$out" "$name/release.wasm"; then
      echo "ok       $name/release.wasm"
    else
      echo "stale    $name/release.wasm (run plugins/build.sh and commit it)" >&2
      status=1
    fi
  elif cmp -s "$out" "$name/release.wasm"; then
    echo "same     $name/release.wasm"
  else
    cp "$out" "$name/release.wasm"
    echo "built    $name/release.wasm ($(wc -c <"$name/release.wasm") bytes)"
  fi
done
exit "$status"
