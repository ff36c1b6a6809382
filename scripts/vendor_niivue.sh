#!/usr/bin/env bash
# Refresh the viewer's vendored niivue from npm: `make niivue` (NIIVUE_VERSION=0.69.0 by default).
# Keeps only the one self-contained browser ES module niivue builds (dist/index.js, its dependencies bundled in),
# with a first line naming its version and no source map; its licence (BSD-2-Clause) is checked, as npm's package.json states it.
# The npm package ships no LICENSE file: serve_app/viewer/static/niivue/LICENSE holds niivue's, from its repository.
set -euo pipefail
version="${1:?usage: vendor_niivue.sh VERSION}"
target="$(cd "$(dirname "$0")/.." && pwd)/serve_app/viewer/static/niivue"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@niivue/niivue@$version" >/dev/null && tar xzf niivue-niivue-"$version".tgz)
licence="$(node -p "require('$work/package/package.json').license")"
if [ "$licence" != "BSD-2-Clause" ]; then
  echo "@niivue/niivue@$version is licensed $licence, not BSD-2-Clause: check it before vendoring" >&2
  exit 1
fi
{
  echo "/* @niivue/niivue $version, dist/index.js from npm (BSD-2-Clause, see LICENSE); refreshed by make niivue */"
  # Without its source-map comment: the map (4.8 MB) is not shipped.
  grep -v '^//# sourceMappingURL=' "$work/package/dist/index.js"
} >"$target/niivue.js"
echo "vendored @niivue/niivue@$version into $target/niivue.js ($(wc -c <"$target/niivue.js") bytes)"
