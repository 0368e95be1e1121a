#!/usr/bin/env bash
# The one command a session lent an H200 runs, from the repo root of the device machine's copy:
#
#   device tool: run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
#
# Steps, in this order (the benchmark numbers before the slow sanitizer runs), each under `timeout` and inside an
# overall budget, so one hang cannot eat the lease; a failed step is recorded and the next one runs:
#   env        nvidia-smi, torch, nvcc, ncu, compute-sanitizer, peft versions
#   build      pip install -e . for sm_90 against the image's torch (MAX_JOBS=16), then build_info()['with_cuda'];
#              then the g++ emulated build the report needs starts in the background (CPU only; waited for before
#              bench, so it never competes with the benchmark)
#   cuda_tests pytest -m cuda tests (the junit XML is appended to tests.log)
#   bench      python -m vera_ext bench --preset h200 (gpu_bench.log; its JSON goes into results.json)
#   report     benchmarks/kernel_report.py: the kernel cost model's predictions (optional; into results.json)
#   ncu        benchmarks/gpu_kernel_check.py: those predictions vs ncu's counters or CUDA events (optional;
#              kernel_check.log, JSON into results.json)
#   memcheck   compute-sanitizer memcheck on tests/gpu/sanitize_kernels.py (every op, small shapes)
#   racecheck  compute-sanitizer racecheck on our kernels only, sanitize_kernels.py --quick
#   synccheck  compute-sanitizer synccheck, likewise (optional)
#   full_tests the rest of the test suite with the time left (optional)
# The optional report and ncu steps get only the time that leaves memcheck and racecheck RESERVE_S (150 s), so
# they cannot push a required step out of the budget.
# Files under $OUT (the device tool brings back 8 at most; exactly these 8): summary.txt check.log build.log
# tests.log sanitizer.log gpu_bench.log kernel_check.log (the report's output, then the predicted-vs-measured
# tables) results.json ({"gpu_bench", "kernel_report", "kernel_check"}: the three scripts' JSON files, merged at
# the end). Exit status: 0 when every required step passed, 1 otherwise.
#
# Knobs: CHECK_BUDGET_S (default 540: whole script), CHECK_STEPS (default all; e.g. "build bench" for a rerun on a
# warm machine, whose build is then incremental), PYTHON (default python3), NCU (default: ncu on PATH, else
# /usr/local/cuda/bin/ncu).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${CHECK_BUDGET_S:-540}
STEPS=${CHECK_STEPS:-"env build cuda_tests bench report ncu memcheck racecheck synccheck full_tests"}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

exec > >(tee -a "$OUT/check.log") 2>&1
TEE_PID=$!

SUMMARY=()
FAILED=0
BUILD_OK=1
RESERVE=0  # seconds a step must leave for the required steps after it
RESERVE_S=150  # memcheck + racecheck, expected
SCRATCH=$(mktemp -d)  # what must not land in $OUT (8 files come back)

elapsed() { echo $(( $(date +%s) - START )); }
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
record() {  # record NAME STATUS SECONDS LOG
  SUMMARY+=("$(printf '%-11s %-30s %5ss  %s' "$1" "$2" "$3" "$4")")
  echo "---- $1: $2 (${3}s; log: $4)"
}

# step NAME LIMIT_S LOG REQUIRED COMMAND...   LOG "-" means this script's own output (check.log).
step() {
  local name=$1 limit=$2 log=$3 required=$4
  shift 4
  wanted "$name" || return 0
  if [[ $BUILD_OK != 1 && $name != env && $name != build ]]; then
    record "$name" "SKIPPED (no build)" 0 -
    (( required )) && FAILED=$((FAILED + 1))
    return 0
  fi
  local left=$(( BUDGET - $(elapsed) - 15 - RESERVE ))  # 15 s kept for the summary
  if (( left < 30 )); then
    record "$name" "SKIPPED (out of time)" 0 -
    (( required )) && FAILED=$((FAILED + 1))
    return 0
  fi
  (( limit > left )) && limit=$left
  echo
  echo "==== $name (limit ${limit}s; ${BUDGET}s budget, $(elapsed)s used) $(date +%T)"
  local path=-
  [[ $log != - ]] && path="$OUT/$log" && echo "==== $name: $*" >>"$path"
  local t0 rc
  t0=$(date +%s)
  # a shell function of this script runs in a child bash (timeout runs programs); they are exported below
  declare -F "$1" >/dev/null && set -- bash -c '"$@"' _ "$@"
  if [[ $log == - ]]; then
    timeout -k 10 "$limit" "$@"
  else
    timeout -k 10 "$limit" "$@" >>"$path" 2>&1
  fi
  rc=$?
  [[ $log != - ]] && echo >>"$path"  # a killed command may leave its last line open
  local took=$(( $(date +%s) - t0 )) status
  case $rc in
    0) status=PASSED ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (rc=$rc)" ;;
  esac
  if (( rc != 0 )); then
    if (( required )); then FAILED=$((FAILED + 1)); else status="$status, optional"; fi
    [[ $log != - ]] && { echo "     last lines of $log:"; tail -n 25 "$path" | sed 's/^/     | /'; }
  fi
  record "$name" "$status" "$took" "$log"
  return $rc
}

versions() {
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used \
    --format=csv || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda",
torch.version.cuda, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'
  "$PY" -c 'import peft, transformers; print("peft", peft.__version__, "| transformers", transformers.__version__)'
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || ls /usr/local/cuda/bin/nvcc
  if [[ -x $NCU ]]; then "$NCU" --version | tail -n 1; else echo "ncu not found at $NCU"; fi
  if [[ -x $CS ]]; then "$CS" --version | head -n 3; else echo "compute-sanitizer not found at $CS"; fi
  nproc
}

check_build() {
  "$PY" - <<'PY'
import torch, vera_ext
info = vera_ext.build_info()
print("build_info:", info, "| torch", torch.__version__, "| cuda available:", torch.cuda.is_available())
missing = [op for op in ("vera_forward", "vera_linear_forward", "vera_backward", "vera_delta_weight", "vera_merge_")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vera_ext::{op}", "CUDA")]
assert info["with_cuda"], "vera_ext was built without its CUDA part"
assert not missing, f"no CUDA kernel registered for {missing}"
assert torch.cuda.is_available(), "torch sees no GPU"
PY
}

build() {
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 VERA_EXT_CUDA=1 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . && check_build
}

cuda_tests() {  # pytest -m cuda; fails too when every CUDA test was skipped (a GPU the tests cannot see)
  "$PY" -m pytest $PYTEST_OPTS -m cuda --junitxml="$SCRATCH/junit.xml" tests
  local rc=$?
  echo "==== junit XML"
  cat "$SCRATCH/junit.xml"
  echo
  "$PY" - "$SCRATCH/junit.xml" <<'PY' || rc=1
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
n, skipped = int(suite.get("tests")), int(suite.get("skipped"))
print(f"CUDA tests: {n} selected, {n - skipped} ran, {skipped} skipped")
sys.exit(0 if n > skipped else 1)
PY
  return $rc
}

# The report's emulated build (g++, csrc/cuda with -DVERA_EMULATE_CUDA), niced, in the background during cuda_tests;
# kernel_report.py then finds it built. Its output is dropped: the report step runs the (then incremental) build
# again, and a failure shows there, in kernel_check.log.
prebuild_emu() {
  MAX_JOBS=16 nice -n 10 timeout -k 10 240 "$PY" tests/emulated/emu_build.py >"$SCRATCH/emu_build.log" 2>&1
}
wait_emu() {  # before a step that needs the CPU to itself (bench) or the emulated build (report)
  [[ -n ${EMU_PID:-} ]] && wait "$EMU_PID"
  EMU_PID=
}

# gpu_bench.json, kernel_report.json, kernel_check.json -> results.json, so that 8 files are left in $OUT
collect_results() {
  "$PY" - "$OUT" <<'PY'
import json, os, sys
out, doc = sys.argv[1], {}
for name in ("gpu_bench", "kernel_report", "kernel_check"):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        continue
    with open(path, errors="replace") as fh:
        text = fh.read()
    try:
        doc[name] = json.loads(text)
    except ValueError as err:  # e.g. a script killed while writing: keep what it wrote
        doc[name] = {"unreadable": f"{name}.json: {err}", "text": text}
    os.remove(path)
with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump(doc, fh, indent=1)
print("results.json:", ", ".join(doc) or "nothing to collect")
PY
}

CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
PYTEST_OPTS="-q -p no:cacheprovider -rfE"
"$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST_OPTS+=" --timeout=300"
export PY CS NCU OUT PYTEST_OPTS SCRATCH
export -f versions check_build build cuda_tests

echo "gpu_check: $(date -u +%FT%TZ), budget ${BUDGET}s, steps: $STEPS, OUT=$OUT"
command -v nvidia-smi >/dev/null ||
  echo "gpu_check: WARNING: no nvidia-smi on this machine; this script is for the GPU machine (device tool)"
step env 60 - 1 versions
step build 420 build.log 1 build || BUILD_OK=0
if [[ $BUILD_OK == 1 ]] && wanted report; then
  prebuild_emu &
  EMU_PID=$!
fi
step cuda_tests 240 tests.log 1 cuda_tests
wait_emu
step bench 300 - 1 "$PY" -m vera_ext bench --device cuda --preset h200 --no-progress \
  --json "$OUT/gpu_bench.json" --log "$OUT/gpu_bench.log"
{ wanted memcheck || wanted racecheck; } && RESERVE=$RESERVE_S
# bf16 only: the cases gpu_kernel_check measures (all three dtypes take about three times as long)
step report 150 kernel_check.log 0 env MAX_JOBS=16 "$PY" benchmarks/kernel_report.py --dtypes bf16 \
  --json "$OUT/kernel_report.json"
step ncu 180 - 0 "$PY" benchmarks/gpu_kernel_check.py --report "$OUT/kernel_report.json" --out "$OUT"
RESERVE=0
step memcheck 240 sanitizer.log 1 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  "$CS" --tool memcheck --error-exitcode 1 --print-limit 50 "$PY" tests/gpu/sanitize_kernels.py
step racecheck 180 sanitizer.log 1 \
  "$CS" --tool racecheck --kernel-name kns=vera --error-exitcode 1 --print-limit 50 \
  "$PY" tests/gpu/sanitize_kernels.py --quick
step synccheck 90 sanitizer.log 0 \
  "$CS" --tool synccheck --kernel-name kns=vera --error-exitcode 1 --print-limit 50 \
  "$PY" tests/gpu/sanitize_kernels.py --quick
step full_tests 600 tests.log 0 "$PY" -m pytest $PYTEST_OPTS -m "not cuda" tests

collect_results
rm -rf "$SCRATCH"
{
  echo "gpu_check summary ($(date -u +%FT%TZ), $(elapsed)s of ${BUDGET}s budget)"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  grep -h "^build_info:" "$OUT/build.log" 2>/dev/null
  grep -hE "^(FAILED|ERROR) |^CUDA tests:|[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran" \
    "$OUT/tests.log" 2>/dev/null | tail -n 30
  grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|^sanitize_kernels:|^FAIL " "$OUT/sanitizer.log" 2>/dev/null
  grep -hE "^(TARGET|SECTION FAILED|VeraLinear\(x)" "$OUT/gpu_bench.log" 2>/dev/null
  grep -hE "^(TARGET|KERNEL_CHECK)" "$OUT/kernel_check.log" 2>/dev/null
  echo
  if (( FAILED )); then echo "OVERALL: FAILED ($FAILED required step(s) did not pass)"; else echo "OVERALL: PASSED"; fi
} >"$OUT/summary.txt"

echo
[[ -f $OUT/gpu_bench.log ]] && sed -n '/^case /,$p' "$OUT/gpu_bench.log"
echo
cat "$OUT/summary.txt"
echo "files in \$OUT ($(ls "$OUT" | wc -l), at most 8 come back): $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $(( FAILED > 0 ))
