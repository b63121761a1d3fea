#!/usr/bin/env bash
# The CPU kernels' tests under AddressSanitizer: an instrumented copy of the extension
# (mlxllm/kernels/cpu) is built in a temporary directory, dropped into a temporary copy of
# the package, and tests/test_cpu_kernels.py plus the kernel cases of tests/test_fuzz.py
# run against it with the compiler's libasan preloaded into Python. Any out-of-bounds
# read or write in a kernel aborts the run with ASan's report. The tree's own build is not
# touched.
#
#   bash scripts/asan_kernels.sh [extra pytest args]
# Environment: PYTHON (default .venv/bin/python), CXX (default c++), KEEP=1 keeps the temp dir.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CXX="${CXX:-c++}"
WORK="$(mktemp -d /tmp/mlxllm-asan.XXXXXX)"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT

LIBASAN="$("$CXX" -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" ]]; then
  echo "asan_kernels: $CXX has no libasan.so (install the compiler's sanitizer runtime)" >&2
  exit 2
fi
# libstdc++ preloaded too: Python does not link it, and ASan's __cxa_throw interceptor
# needs the real one resolvable at start-up (else the first C++ exception aborts).
PRELOAD="$LIBASAN $(readlink -f "$("$CXX" -print-file-name=libstdc++.so)")"

echo "asan_kernels: building an instrumented _cpu in $WORK/build" >&2
SAN="-fsanitize=address -fno-omit-frame-pointer -fno-sanitize-recover=all -g"
cmake -S "$ROOT/mlxllm/kernels/cpu" -B "$WORK/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$CXX" -DPython_EXECUTABLE="$PYTHON" \
  -DCMAKE_CXX_FLAGS="$SAN" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF >"$WORK/cmake.log" 2>&1 \
  || { tail -30 "$WORK/cmake.log" >&2; exit 1; }
cmake --build "$WORK/build" -j "${JOBS:-2}" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log" >&2; exit 1; }
SO="$(find "$WORK/build" -name '_cpu*.so' | head -1)"

# A copy of the package with the instrumented module; tests and scripts beside it, the
# fixtures linked. PYTHONPATH puts the copy before the editable install.
mkdir -p "$WORK/tree/tests"
cp -r "$ROOT/mlxllm" "$ROOT/scripts" "$ROOT/pyproject.toml" "$WORK/tree/"
cp "$ROOT"/tests/*.py "$WORK/tree/tests/"
[[ -d "$ROOT/tests/plugins" ]] && cp -r "$ROOT/tests/plugins" "$WORK/tree/tests/"
[[ -d "$ROOT/tests/shims" ]] && cp -r "$ROOT/tests/shims" "$WORK/tree/tests/"
ln -s "$ROOT/tests/fixtures" "$WORK/tree/tests/fixtures"
rm -f "$WORK"/tree/mlxllm/kernels/cpu/_cpu*.so
cp "$SO" "$WORK/tree/mlxllm/kernels/cpu/"

cd "$WORK/tree"
export PYTHONPATH="$WORK/tree"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
# The instrumented module really is the one imported, and it loads.
LD_PRELOAD="$PRELOAD" "$PYTHON" -c "
import mlxllm.kernels.cpu as c, sys
assert c.KERNELS is not None, c.UNAVAILABLE
assert c.KERNELS.__file__.startswith('$WORK/tree'), c.KERNELS.__file__
print('asan_kernels: testing', c.KERNELS.__file__, file=sys.stderr)"
LD_PRELOAD="$PRELOAD" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py \
  tests/test_fuzz.py -k "test_cpu_kernels or test_kernel_" "$@"  # the fuzz cases fork under a memory limit ASan's shadow exceeds
