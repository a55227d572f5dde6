#!/usr/bin/env bash
# Build the abi3 wheel as a release would (maturin + zig, manylinux2014, auditwheel check), install
# it into a fresh virtual environment and run the test suite against the *installed* package.
#
#   bash .ci/wheel.sh [VENV [PYTEST ARGS...]]      VENV: an environment that already has torch, numpy, pytest,
#                                 hypothesis, scikit-learn (default: the one .ci/run uses)
#
# Nothing is downloaded again per run except ziglang/maturin into a throw-away tool venv (pip's cache
# makes that cheap): the test venv reuses VENV's packages through a .pth line appended *after* its
# own site-packages, so the wheel's `sharpness` shadows VENV's editable install, while torch etc.
# come from VENV. (`--system-site-packages` would expose the base interpreter's site, not VENV's.)
# The editable install's own .pth in VENV is not processed (only site dirs get .pth processing), so
# the source tree's python/ never lands on sys.path; the tests run from a copy of tests/ in a temp
# dir with `-p no:cacheprovider`, and the script asserts where `sharpness` was imported from.
#
# Env: WHEEL_OUT=DIR keeps the wheel there (default: a temp dir, printed); CARGO_TARGET_DIR
# defaults to target/wheel so the zig/manylinux build does not invalidate target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

VENV="${1:-${SHARPNESS_VENV:-$HOME/.cache/sharpness/venv}}"
shift $(( $# > 0 ? 1 : 0 ))  # further arguments go to pytest
VENV="$(cd "$VENV" && pwd)"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "wheel.sh: no python in $VENV" >&2; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sharpness-wheel.XXXXXX")"
trap 'rm -rf "$WORK/tool" "$WORK/test" "$WORK/tests" "$WORK/notorch" "$WORK/examples" "$WORK/docs" "$WORK/benches"' EXIT
OUT="${WHEEL_OUT:-$WORK/dist}"
mkdir -p "$OUT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/wheel}"

echo "== build tools (throw-away venv)"
"$PY" -m venv "$WORK/tool"
"$WORK/tool/bin/python" -m pip install -q --disable-pip-version-check ziglang "maturin>=1.7,<2"

echo "== maturin build (abi3, manylinux2014 via zig, auditwheel check)"
rm -f "$OUT"/sharpness-*.whl
# maturin looks for zig on PATH or as `python -m ziglang` of the python on PATH.
PATH="$WORK/tool/bin:$PATH" "$WORK/tool/bin/maturin" build --release --zig --compatibility manylinux2014 \
    --auditwheel check --out "$OUT"
WHEEL="$(ls "$OUT"/sharpness-*.whl)"
[ "$(echo "$WHEEL" | wc -l)" -eq 1 ] || { echo "wheel.sh: expected one wheel in $OUT" >&2; exit 1; }
case "$(basename "$WHEEL")" in
    *-cp310-abi3-manylinux_2_17_*.whl|*-cp310-abi3-manylinux2014_*.whl) ;;
    *) echo "wheel.sh: unexpected wheel tag: $WHEEL" >&2; exit 1 ;;
esac
echo "wheel: $WHEEL ($(du -h "$WHEEL" | cut -f1))"
"$WORK/tool/bin/python" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["sharpness/__init__.py", "sharpness/_core.abi3.so", "sharpness/_core.pyi", "sharpness/py.typed"]
missing = [n for n in need if n not in names]
assert not missing, f"wheel lacks {missing}"
print(f"wheel contents: {len(names)} files, native module and stubs present")
EOF

echo "== the wheel without torch: a fresh venv with the wheel and what it depends on (numpy) only"
"$PY" -m venv "$WORK/notorch"
NPY="$WORK/notorch/bin/python"
"$NPY" -m pip install -q --disable-pip-version-check "$WHEEL"
if "$NPY" -c "import torch" 2>/dev/null; then
    echo "wheel.sh: the wheel brought torch along; the numpy front must not need it" >&2
    exit 1
fi
echo "installed without torch: $(du -sm "$("$NPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" | cut -f1) MB of packages"
(cd "$WORK" && "$NPY" -X importtime -c "import sharpness.numpy" 2>&1 | tail -n 1)
(cd "$WORK" && "$NPY" "$ROOT/tests/numpy_without_torch.py")
"$NPY" -m pip install -q --disable-pip-version-check scikit-learn  # what the example's data needs
(cd "$WORK" && "$NPY" "$ROOT/docs/numpy_example.py")

echo "== fresh venv + wheel (dependencies from $VENV)"
"$PY" -m venv "$WORK/test"
TPY="$WORK/test/bin/python"
VSITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TSITE="$("$TPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# .pth lines are appended after the directory holding them: the venv's own packages win.
echo "$VSITE" > "$TSITE/zz_sharpness_ci_deps.pth"
"$TPY" -m pip install -q --disable-pip-version-check --no-deps --no-index "$WHEEL"

mkdir -p "$WORK/tests"
cp -r "$ROOT/tests/." "$WORK/tests/"
rm -rf "$WORK/tests/__pycache__"
# the source-tree files some tests read beside tests/ (the examples they run, the guide's snippet,
# the benchmark harness): copies, so that the code under test is still the installed wheel (no
# python/: the API reference's checks, which read the sources, skip themselves)
cp -r "$ROOT/examples" "$ROOT/docs" "$ROOT/benches" "$WORK/"
cd "$WORK/tests"
"$TPY" - "$WORK/test" "$ROOT" <<'EOF'
import os, sys
import sharpness, sharpness._core
venv, root = (os.path.realpath(p) for p in sys.argv[1:3])
for mod in (sharpness, sharpness._core):
    f = os.path.realpath(mod.__file__)
    assert f.startswith(venv + os.sep), f"{mod.__name__} imported from {f}, not from {venv}"
    assert not f.startswith(root + os.sep), f"{mod.__name__} imported from the source tree: {f}"
print("installed sharpness:", os.path.dirname(sharpness.__file__))
EOF

echo "== tests against the installed wheel"
# test_bench_passes_its_arguments_through needs benches/bench_step.py from a source checkout
# (an installed package has none: `sharpness bench` then exits 2, as test_bench_outside_a_source_checkout checks).
PYTHONDONTWRITEBYTECODE=1 "$TPY" -m pytest -q -p no:cacheprovider --rootdir "$WORK/tests" "$WORK/tests" \
    --deselect test_demo.py::test_bench_passes_its_arguments_through "$@"
echo "wheel OK: $WHEEL"
