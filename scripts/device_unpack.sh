#!/usr/bin/env bash
# On the lent GPU machine: gather the parts made by scripts/device_bundle.py (one part carried per device call,
# calls back to back while the machine is warm), then install them.
#   bash scripts/device_unpack.sh             # copy the carried .ship/part*/ files to $SHIP_DIR (/root/ship)
#   bash scripts/device_unpack.sh --install   # also: check and join the parts, install the wheels into
#                                             # /tmp/site and write $SHIP_DIR/env.sh, which puts the wheels and
#                                             # the tasks' files on PYTHONPATH (source it before scripts/reproduce.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
SHIP="${SHIP_DIR:-/root/ship}"
PY="${PYTHON:-python3}"
mkdir -p "$SHIP"
shopt -s nullglob
for f in "${SHIP_SRC:-.ship}"/part*/*; do cp "$f" "$SHIP/"; done
have=$(find "$SHIP" -maxdepth 1 -name 'bundle.part*' | wc -l)
echo "device_unpack: $have part(s) in $SHIP"
[ "${1:-}" = "--install" ] || exit 0
[ -f "$SHIP/MANIFEST" ] || { echo "device_unpack: error: no MANIFEST in $SHIP; carry a .ship/partK folder" >&2; exit 2; }
want=$(sed -n 's/^parts=//p' "$SHIP/MANIFEST")
sha=$(sed -n 's/^sha256=//p' "$SHIP/MANIFEST")
if [ "$have" -ne "$want" ]; then
  echo "device_unpack: error: $have of $want parts in $SHIP; carry the missing .ship/partK folders first" >&2
  exit 2
fi
got=$(cat "$SHIP"/bundle.part* | sha256sum | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "device_unpack: error: the joined parts do not match the bundle (sha256 $got, want $sha); rebuild it" >&2
  exit 2
fi
rm -rf "$SHIP/bundle"
cat "$SHIP"/bundle.part* | tar -x -C "$SHIP"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$SHIP"/bundle/wheels/*.whl
echo "export PYTHONPATH=/tmp/site:$SHIP/bundle/data\${PYTHONPATH:+:\$PYTHONPATH}" >"$SHIP/env.sh"
echo "device_unpack: installed $(ls "$SHIP"/bundle/wheels | wc -l) wheels into /tmp/site; now: . $SHIP/env.sh"
