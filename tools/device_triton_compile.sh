#!/usr/bin/env bash
# The sm_90 compile tests (`pytest -k sm90`: Triton's own ptxas, no GPU) under the device image's Triton (3.6.0,
# ../shared/device-notes.md) instead of this machine's 3.9. A kernel that compiles under 3.9 but not 3.6 passes
# CI and fails on the H200: from c03e12a to b995b38 every engine start there failed on a jit helper's str
# default (BENCHMARKS.md, twenty-sixth session). Run it before a device call that carries kernel changes, from
# the repository root with the test environment active. Triton 3.6.0's wheel (~190 MB) is fetched once into
# $T36 (default /tmp/triton-3.6.0). Extra arguments go to pytest.
set -eu -o pipefail
cd "$(dirname "$0")/.."
T36=${T36:-/tmp/triton-3.6.0}
if [ ! -f "$T36/triton/__init__.py" ]; then
  python -m pip download -q --no-deps triton==3.6.0 -d "$T36.dl" --only-binary=:all:
  python -m pip install -q --no-deps --target "$T36" "$T36.dl"/triton-3.6.0-*.whl
fi
# two scripts fail under 3.6 with no device failure behind them: the PDL test's unspecialised compile of the
# rotary prologue (a 3.6 lowering error; the launcher's specialised kernel runs on the device) and the all-reduce
# norm's PTX spelling check
PYTHONPATH="$T36" python -m pytest -q -p no:cacheprovider tests/ -k sm90 \
  --deselect tests/kernels/test_pdl.py::test_pdl_kernels_compile_for_sm90_with_griddepcontrol_only_when_on \
  --deselect tests/kernels/test_triton_all_reduce_norm.py::test_kernel_compiles_for_sm90_without_gpu "$@"
