#!/usr/bin/env bash
# The CUDA checks of the real-run backend in one command, for a machine with one NVIDIA GPU:
# calibrate the GPU with experts in pinned host memory, then `confirm` (calibrate again, five
# policy arms run for real and simulated). About 3-5 minutes on an H200 by estimate; it has not
# been run yet (docs/fidelity.md says what to record from it).
#
#   OUT=some/dir scripts/gpu_confirm.sh     (exit 0: both ran; 2: a command refused its input; 3: packages missing)
#
# What comes back under $OUT: calibrate.log, local-cuda.yaml, confirm.log, confirm.json,
# confirm.parquet, profile.yaml (the pooled profile confirm used), env.txt: seven files.
#
# A machine without this project's core packages (simpy, polars, plotly, omegaconf) and no
# package index: put their wheels for its Python in .whl/ (git-ignored), and this script unpacks
# them into .site/ (git-ignored, kept between calls on the same machine) first. Fetch them with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     simpy plotly narwhals packaging omegaconf polars==1.20.0
# (polars 1.20 is one 33 MB wheel and passes the realrun/confirm tests; polars 2.x needs a 54 MB
# runtime wheel besides). Where a call may carry only 64 MiB with the working tree (~31 MB),
# carry polars alone first (the script unpacks it and exits 3, naming what is still missing),
# then the rest while the machine is still up.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/gpu-confirm}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then  # unpacked, not pip-installed: pip may be missing there
    for w in .whl/*.whl; do "$py" -m zipfile -e "$w" .site; done
fi
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# real imports (a wheel fetched without its dependencies passes a mere lookup and fails later)
if ! "$py" -c "import numpy, scipy.stats, yaml, tqdm, simpy, omegaconf, polars, plotly.graph_objects, torch" \
        2>"$out/missing.txt"; then
    echo "missing Python packages: $(tail -1 "$out/missing.txt") (put their wheels in .whl/ and run again)" \
        | tee "$out/env.txt"
    exit 3
fi
rm -f "$out/missing.txt"
{
    "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$py" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || true
    nproc
} 2>&1 | tee "$out/env.txt"
# each step runs whatever the one before did: the confirm is what matters most, so it goes first
status=0
s0=$SECONDS
full=$(mktemp -d)/confirm  # every arm's results folders: kept out of $OUT, which brings back a few files only
"$py" -m sim confirm device=cuda store=host calibrate out="$full" progress=false 2>&1 | tee "$out/confirm.log" \
    || status=$?
echo "confirm: $((SECONDS - s0)) s" | tee -a "$out/confirm.log"
cp "$full/confirm.json" "$full/confirm.parquet" "$full/profile.yaml" "$out/" 2>/dev/null || true
s1=$SECONDS
"$py" -m sim calibrate device=cuda store=host model=mixtral-mini out="$out/local-cuda.yaml" progress=false 2>&1 \
    | tee "$out/calibrate.log" || status=$?
echo "calibrate: $((SECONDS - s1)) s; confirm + calibrate: $((SECONDS - s0)) s" | tee -a "$out/calibrate.log"
exit "$status"
