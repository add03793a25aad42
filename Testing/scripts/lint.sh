#!/usr/bin/env bash
# Static checks that the code stays runnable by Slicer's Python (3.9.10 in Slicer 5.6 and 5.8):
#   1. ruff with the [tool.ruff] settings of pyproject.toml (target py39: newer syntax is an error);
#   2. vermin: no standard-library feature newer than 3.9 (annotations evaluated, as parameterNodeWrapper does);
#   3. a real Python 3.9, when one is found: byte-compiles every file, then imports each SSMSRRegistrationLib module
#      (a module whose third-party imports are missing there is skipped; any other import error is a finding).
# Exits non-zero when any check reports something. Usage: Testing/scripts/lint.sh   (from anywhere)
# Environment: VENV (default: .venv of the project), PYTHON39 (a Python 3.9 interpreter to use).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
VENV="${VENV:-$ROOT/.venv}"
PATHS=(SSMSRRegistration Testing)
status=0

for tool in ruff vermin; do
    if [ ! -x "$VENV/bin/$tool" ]; then
        echo "lint: $VENV/bin/$tool is missing; install the test extra: $VENV/bin/pip install -c constraints.txt -e '.[test]'" >&2
        exit 2
    fi
done

echo "== ruff $("$VENV/bin/ruff" --version | cut -d' ' -f2)"
"$VENV/bin/ruff" check --no-cache --output-format concise "${PATHS[@]}" || status=1

echo "== vermin $("$VENV/bin/vermin" --version)"
"$VENV/bin/vermin" --no-config-file --target=3.9- --violations --eval-annotations --no-tips --quiet "${PATHS[@]}" \
    || status=1

find_python39() {
    local candidate
    for candidate in "${PYTHON39:-}" python3.9 "$(pyenv root 2>/dev/null)"/versions/3.9*/bin/python3.9; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if PY39="$(find_python39)"; then
    echo "== $("$PY39" -V 2>&1) ($PY39): compileall, imports"
    PYC="$(mktemp -d)"
    trap 'rm -rf "$PYC"' EXIT
    # Byte-code goes to a temporary folder, not next to the sources.
    PYTHONPYCACHEPREFIX="$PYC" "$PY39" -m compileall -q "${PATHS[@]}" || status=1
    PYTHONPYCACHEPREFIX="$PYC" "$PY39" - <<'EOF' || status=1
import importlib
import pkgutil
import sys
import traceback

sys.path.insert(0, "SSMSRRegistration")
# Not stdlib: a module that needs one of these is skipped when this interpreter lacks it.
THIRD_PARTY = {"numpy", "torch", "SimpleITK", "slicer", "vtk", "vtkmodules", "qt", "ctk", "matplotlib", "scipy",
               "pydicom", "tqdm", "dask", "distributed", "PIL", "nibabel", "nilearn", "pytest"}
import SSMSRRegistrationLib

imported, skipped, failed = [], {}, []
for module in pkgutil.walk_packages(SSMSRRegistrationLib.__path__, "SSMSRRegistrationLib."):
    if module.name.endswith(".__main__"):
        continue  # runs the command line
    try:
        importlib.import_module(module.name)
        imported.append(module.name)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] in THIRD_PARTY:
            skipped.setdefault(error.name.split(".")[0], []).append(module.name)
        else:
            failed.append((module.name, repr(error)))
    except Exception as error:  # a SyntaxError, or a TypeError from `X | Y` evaluated at import time, ...
        failed.append((module.name, "".join(traceback.format_exception_only(type(error), error)).strip()))
print(f"imported {len(imported)} modules; skipped {sum(map(len, skipped.values()))} that need "
      + (", ".join(f"{name} ({len(names)})" for name, names in sorted(skipped.items())) or "nothing missing"))
for name, message in failed:
    print(f"{name}: {message}")
sys.exit(1 if failed else 0)
EOF
else
    echo "== note: no Python 3.9 interpreter found (set PYTHON39=/path/to/python3.9); the compile and import checks" \
         "under 3.9 did not run"
fi

if [ "$status" -ne 0 ]; then
    echo "lint: findings above" >&2
fi
exit "$status"
