#!/usr/bin/env bash
# Fetch the NiiVue browser bundle used by `atlasbuilder view` from the npm registry (no CDN at
# run time). The bundle is not committed: it lands in atlasbuilder/export/viewer_page/vendor/,
# which .gitignore excludes. Needs npm (Node.js >= 18). Idempotent: does nothing when the pinned
# version is already there.
#
#   scripts/fetch_viewer_assets.sh            # pinned version
#   NIIVUE_VERSION=0.69.0 scripts/fetch_viewer_assets.sh
set -euo pipefail

NIIVUE_VERSION="${NIIVUE_VERSION:-0.69.0}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$here/atlasbuilder/export/viewer_page/vendor"
stamp="$dest/niivue.version"

if [[ -f "$dest/niivue.umd.js" && -f "$dest/.gitignore" && -f "$stamp" && "$(cat "$stamp")" == "$NIIVUE_VERSION" ]]; then
    echo "NiiVue $NIIVUE_VERSION already in $dest"
    exit 0
fi
command -v npm >/dev/null || { echo "error: npm is needed to fetch NiiVue (apt-get install npm)" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
( cd "$work" && npm pack --silent "@niivue/niivue@$NIIVUE_VERSION" >/dev/null )
tar -xzf "$work"/niivue-niivue-"$NIIVUE_VERSION".tgz -C "$work" package/dist/niivue.umd.js package/package.json
if [[ ! -s "$work/package/dist/niivue.umd.js" ]]; then
    echo "error: the npm package @niivue/niivue@$NIIVUE_VERSION has no dist/niivue.umd.js" >&2
    exit 1
fi
mkdir -p "$dest"
# belt and braces next to the top-level .gitignore entry: the bundle must never be committed
printf '*\n' > "$dest/.gitignore"
# licence notice next to the bundle (NiiVue is BSD-2-Clause)
node -e 'const p=require(process.argv[1]); console.log(`${p.name} ${p.version} (${p.license}) ${p.repository && p.repository.url || ""}`)' \
    "$work/package/package.json" > "$work/NOTICE.txt"
mv "$work/package/dist/niivue.umd.js" "$dest/niivue.umd.js.tmp"
mv "$dest/niivue.umd.js.tmp" "$dest/niivue.umd.js"
mv "$work/NOTICE.txt" "$dest/NOTICE.txt"
echo "$NIIVUE_VERSION" > "$stamp"
echo "NiiVue $NIIVUE_VERSION -> $dest/niivue.umd.js"
