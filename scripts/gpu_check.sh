#!/usr/bin/env bash
# The first GPU run, sized for ONE call of at most 8 minutes on an H100/H200
# (the build included). Parts, each with its own time limit, never stopping at a
# failure; every part writes its results as soon as it ends:
#
#   part       limit (s)  what                                                  files (<stem> = <date>-<gpu>)
#   device         -      nvidia-smi, torch / triton / CUDA versions            <stem>-check.log (all output)
#   build        180      restorenet._C for TORCH_CUDA_ARCH_LIST (9.0a on an     <stem>-build.log
#                         H100/H200), MAX_JOBS = CPU count, no network
#   tests         75      scripts/gpu_tests.txt: one case per op x backend x     <stem>-tests.log, <stem>-tests.md
#                         dtype + bf16 + 64-bit indexing, pass/fail per file
#   bench        150      the benchmarks behind every target of                  <stem>-<group>.json, <stem>.json
#                         restorenet/bench_targets.py, in 5 groups (each its
#                         own JSON, so a group cut short loses only itself)
#   ncu           30      one Nsight Compute LaunchStats line of                 <stem>-ncu.csv
#                         hyper_conv2d_fwd_kernel (bf16, 16x64x96x96)
#   report        10      restorenet.bench_report: targets + benchmark table     <stem>.md, <stem>-check.json
#
# The limits add up to 445 s; the whole run is also held to TOTAL_S (default 470 s):
# a part gets at most what is left of it (less 15 s for the report), so the call
# ends within 8 minutes whatever hangs. Files land in $OUT when set, else in
# bench/results/, named to be committed as they are (bench/results/<stem>.{json,md}).
#
# Usage: bash scripts/gpu_check.sh [--allow-cpu] [--no-build] [--no-tests] [--no-bench] [--no-ncu]
#   --allow-cpu  run without a CUDA device (the build and ncu skip with a reason; the test
#                selection without its Triton cases, which the CPU interprets; each benchmark
#                group's fp32 CPU cases of the reference strategy): checks the machinery
# Environment: PYTHON (default python3), TOTAL_S, BUILD_S, TESTS_S, BENCH_S, NCU_S (limits),
#   TORCH_CUDA_ARCH_LIST, MAX_JOBS, BENCH_TARGET_S (timed seconds per benchmark, default 0.1).
# Exit status: 0 when every part that ran passed.
set -uo pipefail

ALLOW_CPU=0 DO_BUILD=1 DO_TESTS=1 DO_BENCH=1 DO_NCU=1
for arg in "$@"; do
  case "$arg" in
    --allow-cpu) ALLOW_CPU=1 ;;
    --no-build) DO_BUILD=0 ;;
    --no-tests) DO_TESTS=0 ;;
    --no-bench) DO_BENCH=0 ;;
    --no-ncu) DO_NCU=0 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
START=$SECONDS
TOTAL_S="${TOTAL_S:-470}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 BENCH_TARGET_S="${BENCH_TARGET_S:-0.1}"
unset TRITON_INTERPRET

HAS_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
if [[ "$HAS_CUDA" != 1 && "$ALLOW_CPU" != 1 ]]; then
  echo "gpu_check.sh: error: torch sees no CUDA device; pass --allow-cpu to run anyway" >&2
  exit 2
fi
SLUG="$("$PY" -c '
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))')"
STEM="$(date -u +%F)-${SLUG}"
RESULTS="${OUT:-$REPO/bench/results}"
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/$STEM-check.log") 2>&1
PARTS="$RESULTS/$STEM-check.json"
echo "[]" > "$PARTS"
FAILED=() JSONS=()

# record PART STATUS SECONDS LIMIT NOTE: one entry of <stem>-check.json, written at once.
record() {
  "$PY" - "$PARTS" "$@" <<'PYEOF'
import json, sys
path, part, status, seconds, limit, note = sys.argv[1:7]
parts = json.load(open(path))
parts.append(dict(part=part, status=status, seconds=int(seconds), limit=int(limit), note=note))
json.dump(parts, open(path, "w"), indent=1)
PYEOF
  printf '[gpu_check] %-12s %-8s %4ss (limit %ss) %s\n' "$1" "$2" "$3" "$4" "$5"
  [[ "$2" == passed || "$2" == skipped ]] || FAILED+=("$1")
}

# limit PART_DEFAULT: the part's limit, cut to what TOTAL_S leaves (15 s kept for the report).
limit() {
  local left=$(( TOTAL_S - (SECONDS - START) - 15 ))
  (( left < 1 )) && left=1
  (( $1 < left )) && echo "$1" || echo "$left"
}

# run_part NAME LIMIT LOG CMD...: run CMD under `timeout`, log it, record the outcome.
run_part() {
  local name=$1 lim=$2 log=$3; shift 3
  local t0=$SECONDS
  timeout --kill-after=5 "$lim" "$@" > >(tee "$log") 2>&1
  local rc=$?
  local status=passed note=""
  if (( rc == 124 || rc == 137 )); then status=timeout note="cut at ${lim}s"
  elif (( rc == 5 )) && [[ "$HAS_CUDA" != 1 ]]; then status=skipped note="nothing of it runs on a CPU"
  elif (( rc == 5 )); then status=failed note="pytest collected nothing"
  elif (( rc != 0 )); then status=failed note="exit $rc"
  fi
  record "$name" "$status" $(( SECONDS - t0 )) "$lim" "$note"
  return 0
}

printf '\n==== device ====\n'
command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
"$PY" - <<'PYEOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    print("triton", md.version("triton"))
except md.PackageNotFoundError:
    print("triton not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
PYEOF
echo "results: $RESULTS/$STEM.*"

printf '\n==== build ====\n'
if [[ "$DO_BUILD" != 1 ]]; then
  record build skipped 0 0 "--no-build"
elif [[ "$HAS_CUDA" != 1 ]]; then
  record build skipped 0 0 "no CUDA device: restorenet._C needs one"
else
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c '
import torch
major, minor = torch.cuda.get_device_capability(0)
print(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else ""))')"
  fi
  export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  run_part build "$(limit "${BUILD_S:-180}")" "$RESULTS/$STEM-build.log" \
      "$PY" setup.py build_ext --inplace
  "$PY" -c 'import restorenet._C' 2>/dev/null && echo "restorenet._C imports" \
      || record extension failed 0 0 "restorenet._C does not import"
fi

# The package from this checkout, kernels/ as restorenet_kernels, without an install.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import restorenet_kernels' 2>/dev/null; then
  SHIM="$(mktemp -d)"
  ln -s "$REPO/kernels" "$SHIM/restorenet_kernels"
  export PYTHONPATH="$PYTHONPATH:$SHIM"
fi

printf '\n==== tests ====\n'
if [[ "$DO_TESTS" == 1 ]]; then
  mapfile -t TEST_IDS < <(grep -v '^\s*\(#\|$\)' scripts/gpu_tests.txt)
  CPU_ONLY=()
  # On a CPU the Triton cases run in the interpreter (minutes): leave them to the GPU.
  [[ "$HAS_CUDA" == 1 ]] || CPU_ONLY=(-k "not triton")
  # -v: one line per test as it ends, so a cut run still has every result so far.
  run_part tests "$(limit "${TESTS_S:-75}")" "$RESULTS/$STEM-tests.log" \
      "$PY" -m pytest -v -rfE -p no:cacheprovider "${CPU_ONLY[@]}" "${TEST_IDS[@]}"
  "$PY" - "$RESULTS/$STEM-tests.log" "$RESULTS/$STEM-tests.md" <<'PYEOF'
import collections, re, sys
log, out = sys.argv[1:3]
per_file = collections.defaultdict(collections.Counter)
for m in re.finditer(r"^(tests/\S+?\.py)::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", open(log).read(), re.M):
    per_file[m[1]][m[2]] += 1
kinds = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
rows = ["| file | " + " | ".join(k.lower() for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
rows += [f"| {f} | " + " | ".join(str(c[k]) for k in kinds) + " |" for f, c in sorted(per_file.items())]
open(out, "w").write("# GPU test selection (scripts/gpu_tests.txt)\n\n" + "\n".join(rows) + "\n")
print("\n".join(rows))
PYEOF
else
  record tests skipped 0 0 "--no-tests"
fi

printf '\n==== bench ====\n'
# The benchmarks behind every target of restorenet/bench_targets.py, with the peers
# each target compares with (same group): 3.* / 7.matmul hyper, 4.* slim, 7.bandwidth
# element-wise and tile ops, 5.* AdaRevD columns, 6.* AdaRevD.restore.
DT=bf16 ONLY=""
# The CPU harness runs fp32 cases only; there the reference strategy alone (no
# interpreter, no torch.compile) checks the machinery within the limits.
[[ "$HAS_CUDA" == 1 ]] || { DT=fp32; ONLY=" and reference"; }
BENCH_GROUPS=(
  "hyper|45|test_hyper_conv2d and fwd+bwd and $DT"
  "slim|45|test_slim_conv2d and fwd+bwd and $DT"
  "elementwise|25|(test_elementwise and $DT and (triton or cuda)) or test_tile_op"
  "columns|20|test_adarevd_columns and $DT"
  "restore|15|test_adarevd_restore and batched"
)
if [[ "$DO_BENCH" == 1 ]]; then
  for group in "${BENCH_GROUPS[@]}"; do
    IFS='|' read -r name secs expr <<< "$group"
    json="$RESULTS/$STEM-$name.json"
    rm -f "$json"
    run_part "bench $name" "$(limit "$(( secs * ${BENCH_S:-150} / 150 ))")" "$RESULTS/$STEM-$name-bench.log" \
        "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider -k "($expr)$ONLY" --benchmark-json="$json"
    [[ -s "$json" ]] && JSONS+=("$json")  # pytest-benchmark writes it at the end: empty if cut
  done
else
  record bench skipped 0 0 "--no-bench"
fi

printf '\n==== ncu ====\n'
if [[ "$DO_NCU" != 1 ]]; then
  record ncu skipped 0 0 "--no-ncu"
elif [[ "$HAS_CUDA" != 1 ]]; then
  record ncu skipped 0 0 "no CUDA device"
elif ! command -v ncu >/dev/null; then
  record ncu skipped 0 0 "ncu not on PATH"
else
  run_part ncu "$(limit "${NCU_S:-30}")" "$RESULTS/$STEM-ncu.csv" \
      ncu --clock-control none --section LaunchStats --kernel-name regex:hyper_conv2d_fwd_kernel \
          --launch-skip 1 --launch-count 1 --csv --page details \
          "$PY" -c "
import torch
from restorenet.ops import hyper_conv2d
x = torch.randn(16, 64, 96, 96, device='cuda', dtype=torch.bfloat16)
w = torch.randn(64, 64, 3, 3, device='cuda', dtype=torch.bfloat16) * 0.05
for _ in range(2):
    hyper_conv2d(x, torch.rand(16, device='cuda'), w, w, padding=1, backend='triton')
torch.cuda.synchronize()"
fi

printf '\n==== report ====\n'
if (( ${#JSONS[@]} )); then
  t0=$SECONDS
  # One benchmark JSON (<stem>.json) and one report (<stem>.md) of every group.
  if "$PY" - "$RESULTS/$STEM.json" "${JSONS[@]}" <<'PYEOF'
import json, sys
out, parts = sys.argv[1], sys.argv[2:]
merged = json.load(open(parts[0]))
for p in parts[1:]:
    merged["benchmarks"] += json.load(open(p))["benchmarks"]
json.dump(merged, open(out, "w"), indent=1)
PYEOF
  then
    timeout 60 "$PY" -m restorenet.bench_report "$RESULTS/$STEM.json" --out "$RESULTS" \
        --title "restorenet first GPU run $(date -u +%F)" && status=passed || status=failed
    record report "$status" $(( SECONDS - t0 )) 60 "$RESULTS/$STEM.md"
  else
    record report failed $(( SECONDS - t0 )) 60 "the benchmark JSONs did not merge"
  fi
else
  record report skipped 0 0 "no benchmark JSON was written"
fi

printf '\n==== summary (%ss of %ss) ====\n' $(( SECONDS - START )) "$TOTAL_S"
cat "$PARTS"
if (( ${#FAILED[@]} )); then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "every part that ran passed"
