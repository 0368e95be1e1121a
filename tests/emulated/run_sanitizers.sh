#!/usr/bin/env bash
# Builds the emulated CUDA kernels (and the CPU decode path's work claiming, csrc/cpu/claim_pool.cpp) as a
# standalone program (no torch, no python at run time) twice, with
# AddressSanitizer + UndefinedBehaviorSanitizer and with ThreadSanitizer, then
#   1. runs every kernel check and emulation self-test under each: any sanitizer report or failed check fails;
#   2. runs the planted faults of tests/emulated/kernels/planted_faults.cu: each must be reported, or the script fails.
#
# Usage: tests/emulated/run_sanitizers.sh [asan|tsan|all]      (default: all; exit status 0 = everything held)
#        tests/emulated/run_sanitizers.sh --build-only asan|tsan  (prints the program's path)
# Environment: MAX_JOBS (parallel compiles, default 2), CXX (default g++), PYTHON (default python3),
#              VERA_EMU_BUILD_DIR (default <repo>/build/emulated). Builds are cached on a hash of the inputs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD="${VERA_EMU_BUILD_DIR:-$REPO/build/emulated}"
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python3}"
JOBS="${MAX_JOBS:-2}"

COMMON_FLAGS=(-std=c++20 -O1 -g -fno-omit-frame-pointer -pthread -DVERA_EMULATE_CUDA
              -I"$REPO/csrc" -I"$HERE" -I"$HERE/sanitize")
flags_for() {
  case "$1" in
    # -fno-sanitize-recover: the first undefined-behaviour report ends the run with a non-zero status.
    asan) echo "-fsanitize=address,undefined -fno-sanitize-recover=undefined" ;;
    tsan) echo "-fsanitize=thread" ;;
    *) echo "unknown sanitizer configuration: $1 (asan or tsan)" >&2; exit 2 ;;
  esac
}

# Builds build/emulated/sanitize-<cfg>/emu_check unless an identical build exists; prints its path.
build() {
  local cfg="$1" out="$BUILD/sanitize-$1"
  local extra
  extra="$(flags_for "$cfg")"
  mkdir -p "$out/obj"
  local gen
  gen="$("$PYTHON" "$HERE/emu_sources.py" "$out/gen")"
  local listed sources=($gen)
  listed="$("$PYTHON" "$REPO/csrc/sources.py" sanitizer_program)"  # the one source list
  for f in $listed; do sources+=("$REPO/$f"); done
  local stamp
  stamp="$( { echo "$CXX ${COMMON_FLAGS[*]} $extra"; "$CXX" --version | head -1;
              cat "${sources[@]}" "$HERE"/emu/* "$REPO"/csrc/cuda/*.h "$REPO"/csrc/cuda/*.cuh \
                  "$REPO"/csrc/cuda/*.cu "$HERE"/kernels/* "$HERE"/sanitize/*.h \
                  "$REPO"/csrc/cpu/claim_pool.h; } | sha256sum | cut -d' ' -f1)"
  if [[ -x "$out/emu_check" && "$(cat "$out/stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "$out/emu_check"
    return
  fi
  rm -f "$out"/obj/*.o "$out/emu_check" "$out/stamp"
  printf '%s\n' "${sources[@]}" |
    xargs -P "$JOBS" -I{} sh -c 'nice -n 10 "$0" "$@" -c "{}" -o "'"$out"'/obj/$(basename "{}" .cpp).o"' \
      "$CXX" "${COMMON_FLAGS[@]}" $extra >&2
  "$CXX" "${COMMON_FLAGS[@]}" $extra "$out"/obj/*.o -o "$out/emu_check" >&2
  echo "$stamp" > "$out/stamp"
  echo "$out/emu_check"
}

FAILED=0
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; FAILED=1; }

# run CFG MODE clean | run CFG MODE PATTERN...: the run must be clean, or the sanitizer must report a fault
# whose log matches every grep -E PATTERN.
run() {
  local cfg="$1" mode="$2" expect="$3" exe="$BUILD/sanitize-$1/emu_check" log="$BUILD/sanitize-$1/$2.log"
  shift 2
  local rc=0
  ASAN_OPTIONS="detect_leaks=1:halt_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    TSAN_OPTIONS="halt_on_error=0:exitcode=66" VERA_EMU_WATCHDOG_S=600 \
    "$exe" "$mode" > "$log" 2>&1 || rc=$?
  local reported=0
  grep -qE "ERROR: AddressSanitizer|runtime error:|WARNING: ThreadSanitizer|ERROR: LeakSanitizer" "$log" && reported=1
  if [[ "$expect" == clean ]]; then
    if [[ $rc -eq 0 && $reported -eq 0 ]]; then pass "$cfg $mode: no report, every check passed"
    else fail "$cfg $mode: exit status $rc, sanitizer report: $reported (log: $log)"; tail -40 "$log"; fi
  else
    local matched=1 pattern
    for pattern in "$@"; do grep -qE "$pattern" "$log" || matched=0; done
    if [[ $rc -ne 0 && $reported -eq 1 && $matched -eq 1 ]]; then
      local first
      first="$(grep -m1 -E "ERROR: AddressSanitizer|WARNING: ThreadSanitizer|runtime error:" "$log")"
      first="${first##*==[0-9]*==}"
      pass "$cfg $mode: caught: $first"
    else
      fail "$cfg $mode: the planted fault was NOT reported as: $* (exit status $rc; log: $log)"; tail -20 "$log"
    fi
  fi
}

if [[ "${1:-}" == --build-only ]]; then
  build "${2:?--build-only needs asan or tsan}"
  exit 0
fi

WHICH="${1:-all}"
case "$WHICH" in all | asan | tsan) ;; *) echo "usage: $0 [asan|tsan|all] | --build-only asan|tsan" >&2; exit 2 ;; esac
if [[ "$WHICH" == all || "$WHICH" == asan ]]; then
  build asan > /dev/null
  run asan clean clean
  run asan oob "heap-buffer-overflow" "planted_oob_write_kernel"
  # UBSan's bounds check (a known array type) reports this one before ASan's redzone would.
  run asan shared-oob "out of bounds|global-buffer-overflow" "planted_faults.cu|planted_shared_oob_kernel"
fi
if [[ "$WHICH" == all || "$WHICH" == tsan ]]; then
  build tsan > /dev/null
  run tsan clean clean
  run tsan race "data race" "planted_missing_sync_kernel"
fi
exit $FAILED
