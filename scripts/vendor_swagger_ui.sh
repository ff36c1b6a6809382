#!/usr/bin/env bash
# Refresh /docs's vendored Swagger UI from npm: `make swagger-ui` (SWAGGER_UI_VERSION=5.36.0 by default).
# Keeps only what the page loads (swagger-ui-bundle.js, swagger-ui.css, the favicon), without their source-map
# comments (the maps are not shipped), and the licence files: Apache-2.0 (checked, as npm's package.json states it)
# with its NOTICE, and the bundle's list of the licences of what it bundles.
set -euo pipefail
version="${1:?usage: vendor_swagger_ui.sh VERSION}"
target="$(cd "$(dirname "$0")/.." && pwd)/serve_app/viewer/api_docs/swagger-ui"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "swagger-ui-dist@$version" >/dev/null && tar xzf swagger-ui-dist-"$version".tgz)
licence="$(node -p "require('$work/package/package.json').license")"
if [ "$licence" != "Apache-2.0" ]; then
  echo "swagger-ui-dist@$version is licensed $licence, not Apache-2.0: check it before vendoring" >&2
  exit 1
fi
rm -rf "$target" && mkdir -p "$target"
for file in swagger-ui-bundle.js swagger-ui.css; do
  grep -v '^//# sourceMappingURL=\|^/\*# sourceMappingURL=' "$work/package/$file" >"$target/$file"
done
cp "$work/package/"{favicon-32x32.png,LICENSE,NOTICE,swagger-ui-bundle.js.LICENSE.txt} "$target/"
echo "swagger-ui-dist $version, from npm; refreshed by make swagger-ui" >"$target/VERSION"
echo "vendored swagger-ui-dist@$version into $target ($(du -sh "$target" | cut -f1))"
