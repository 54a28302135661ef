#!/usr/bin/env bash
# Idempotent: a real Ironic, in its own virtualenv .venv-ironic at the repository root, for the
# tests that drive our agent through it (tests/test_real_ironic.py). Also installs the
# test-only hardware type in tests/ironic/ironic_test_driver. Everything comes as wheels from
# PyPI: no Debian packages are needed beyond Python's venv module.
#
# Bumping Ironic: change IRONIC_VERSION, run with IRONIC_UNPINNED=1, run the tests, then
# regenerate constraints.txt from `.venv-ironic/bin/pip freeze` (without our test driver).
set -euo pipefail
cd "$(dirname "$0")/../.."

IRONIC_VERSION=39.0.0
venv=.venv-ironic
here=tests/ironic
python=${PYTHON:-python3}

stamp=$venv/.installed-$(cat "$0" "$here/constraints.txt" "$here"/ironic_test_driver/*.py \
                           "$here"/ironic_test_driver/pyproject.toml | sha1sum | cut -c1-12)
if [ -e "$stamp" ]; then
  exit 0
fi

started=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
constraints=(--constraint "$here/constraints.txt")
if [ "${IRONIC_UNPINNED:-0}" = 1 ]; then
  constraints=()
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "${constraints[@]}" "ironic==$IRONIC_VERSION"

# Build the driver from a copy: building in place would leave build/ and *.egg-info behind.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp -r "$here/ironic_test_driver" "$build/"
"$venv/bin/pip" install -q --force-reinstall --no-deps "$build/ironic_test_driver"
"$venv/bin/python" -W ignore - <<'EOF'
from importlib.metadata import entry_points
(test_type,) = [e for e in entry_points(group="ironic.hardware.types") if e.name == "ipa-test"]
test_type.load()
EOF

rm -f "$venv"/.installed-* "$venv"/schema-*.sqlite
touch "$stamp"
echo "setup-ironic: ironic $IRONIC_VERSION in $venv ($(($(date +%s) - started))s)"
