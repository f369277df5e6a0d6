# The common start of the tools/*_device.sh scripts (sourced: `. "$(dirname "$0")/device_env.sh"`): the
# repository root as working directory; unbuffered, offline Python; NVLink multicast off for NCCL / symmetric
# memory (the device machines' rule; no effect on one GPU); the carried wheels (.whl/*.whl and
# .whl-structured/*.whl, xgrammar and its dependencies; .whl-tf/*.whl, a transformers release newer than the
# image's 5.17 with its huggingface-hub (`pip download --no-deps transformers==5.24.0 huggingface-hub==2.4.0`: the
# direct tokenizer path needs >= 5.24, the image's falls back to AutoTokenizer), where there are any: none means the packages are
# installed already) into /tmp/site, a failed install ending the script; PYTHONPATH
# the checkout, then /tmp/site; OUT (where results go back) /tmp/out unless set.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
wheels=$(ls .whl/*.whl .whl-structured/*.whl .whl-nixl/*.whl .whl-tf/*.whl 2> /dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site
OUT=${OUT:-/tmp/out}
# the engine imports msgspec (and the server fastapi etc.): the GPU image lacks them, so a call that did not
# carry .whl fails at import (the sixteenth session lost a call's GPU tests to it): say so at once
python3 -c "import msgspec" 2> /dev/null || echo "device_env.sh: msgspec is missing: carry .whl (meshserve will not import)" >&2
# the image has no httptools / uvloop either: without them the router relays through httpx and uvicorn runs h11 on
# asyncio (the thirty-fourth session's router rows: 2.3x the CPU an event, a collapse at W3 QPS 64 that a user's
# install, which has both, does not show): `fetch-device-wheels.sh ... httptools uvloop` into .whl
# fastapi >= 0.16x imports opentelemetry-api (a wheel easily pruned from .whl: the thirty-fifth session lost a call)
python3 -c "import fastapi" 2> /dev/null || echo "device_env.sh: fastapi does not import (opentelemetry-api missing from .whl?): the server will not start" >&2
python3 -c "import httptools, uvloop" 2> /dev/null || echo "device_env.sh: httptools / uvloop missing: carry them in .whl (the router and API server would run their pure-Python paths)" >&2
# xgrammar (structured outputs; test_no_late_jit's json_object request) imports apache-tvm-ffi at import: a .whl
# pruned of apache_tvm_ffi*.whl fails every structured request on the device (suspected in the thirty-seventh
# session's test_no_late_jit failures)
python3 -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('xgrammar') and u.find_spec('tvm_ffi')))" \
  || echo "device_env.sh: xgrammar or its apache-tvm-ffi is missing (carry both in .whl): structured outputs will fail" >&2
