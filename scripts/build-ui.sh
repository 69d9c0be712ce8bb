#!/usr/bin/env bash
# Install the web UI's pinned npm packages (web/package-lock.json) and copy the
# files the browser loads into src/vmhive/web/static/vendor/, which ships in the
# Python package. Nothing is fetched at run time. Idempotent: a stamp keyed on
# the lock file and this script makes a second run a no-op.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WEB="$ROOT/web"
MODULES="$WEB/node_modules"
DEST="$ROOT/src/vmhive/web/static/vendor"
STAMP="$DEST/.stamp"

key="$(cat "$WEB/package-lock.json" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] && [ -f "$DEST/novnc/core/rfb.js" ]; then
  exit 0
fi
for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "build-ui: $tool is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done

(cd "$WEB" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)

tmp="$(mktemp -d "$ROOT/src/vmhive/web/static/.vendor.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
copy() {  # copy SRC (relative to node_modules) to DEST (relative to vendor/)
  mkdir -p "$(dirname "$tmp/$2")"
  cp -R "$MODULES/$1" "$tmp/$2"
}
# noVNC: native ES modules; core/ imports ../vendor/pako.
copy @novnc/novnc/core novnc/core
copy @novnc/novnc/vendor/pako/lib novnc/vendor/pako/lib
copy @novnc/novnc/LICENSE.txt novnc/LICENSE.txt
copy @xterm/xterm/lib/xterm.mjs xterm/xterm.mjs
copy @xterm/xterm/css/xterm.css xterm/xterm.css
copy @xterm/xterm/LICENSE xterm/LICENSE
copy @xterm/addon-fit/lib/addon-fit.mjs xterm/addon-fit.mjs
copy uplot/dist/uPlot.esm.js uplot/uPlot.esm.js
copy uplot/dist/uPlot.min.css uplot/uPlot.min.css
copy uplot/LICENSE uplot/LICENSE
# Source maps are not shipped: drop the comments that point at them.
sed -i '/^\/\/# sourceMappingURL=/d' "$tmp/xterm/xterm.mjs" "$tmp/xterm/addon-fit.mjs"
chmod 755 "$tmp"
echo "$key" > "$tmp/.stamp"

rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
echo "build-ui: vendor files copied to ${DEST#"$ROOT"/}"
