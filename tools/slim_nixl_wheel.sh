#!/usr/bin/env bash
# A nixl-cu12 wheel without what meshserve's nixl connector never loads, small enough to carry to the device
# machine (its carry limit is 64 MiB; the wheel from the registry is 68 MB): drops nixl_ep_cu12/ (expert-parallel
# all-to-all kernels, ~105 MB unpacked, three builds for three torch versions) and the C++ headers, and rewrites
# RECORD to match, so pip installs it as usual. Same file name (the metadata is unchanged).
#   bash tools/slim_nixl_wheel.sh IN.whl OUT_DIR      e.g. IN = pip download --no-deps nixl-cu12==1.5.1
set -euo pipefail
in=${1:?usage: slim_nixl_wheel.sh IN.whl OUT_DIR}
out=${2:?usage: slim_nixl_wheel.sh IN.whl OUT_DIR}
mkdir -p "$out"
python3 - "$in" "$out" <<'PY'
import os
import re
import sys
import zipfile

src, out_dir = sys.argv[1], sys.argv[2]
dst = os.path.join(out_dir, os.path.basename(src))
if os.path.abspath(dst) == os.path.abspath(src):
    sys.exit("OUT_DIR must differ from the input wheel's folder")
drop = re.compile(r"^(nixl_ep_cu\d+/|[^/]+\.data/headers/)")
kept = dropped = 0
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    for info in zin.infolist():
        if drop.match(info.filename):
            dropped += info.file_size
            continue
        data = zin.read(info)
        if info.filename == record:
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not drop.match(line)).encode()
        info.compress_type = zipfile.ZIP_DEFLATED
        zout.writestr(info, data, compresslevel=9)
        kept += 1
print(f"{dst}: {os.path.getsize(dst) / 2**20:.1f} MiB (was {os.path.getsize(src) / 2**20:.1f} MiB); "
      f"{kept} files kept, {dropped / 2**20:.0f} MiB unpacked dropped")
PY
