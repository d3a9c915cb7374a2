#!/usr/bin/env bash
# One-shot check on a CUDA machine with no network:
#   1. print nvidia-smi and the torch / triton / CUDA versions;
#   2. build the CUDA extension restorenet._C in place (no downloads: --no-index);
#   3. run the whole test suite on the GPU (TRITON_INTERPRET unset);
#   4. run the benchmarks, pytest bench/ --benchmark-only;
#   5. write bench/results/<YYYY-MM-DD>-<gpu-slug>.json + .md (+ PNG plots) with
#      restorenet.bench_report, and the logs next to them;
#   6. if $OUT is set, copy the artifacts there (json, md, logs, plots as one .tar.gz).
#
# Usage: bash scripts/gpu_check.sh [--allow-cpu] [--no-build] [--no-tests] [--no-bench]
#   --allow-cpu  run without a CUDA device (otherwise: exit 2 when none is found)
#   --no-build / --no-tests / --no-bench  skip that phase
# Peer libraries (revlib) for the comparison benchmarks: the machine has no
#   network, so carry their wheels in .whl/ (pip download --no-deps -d .whl
#   revlib==1.7.2); they are installed from there when present.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the
#   device's capability, 9.0 -> 9.0a), BENCH_K (a pytest -k expression choosing
#   benchmarks, e.g. "hyper or slim"), BENCH_ARGS (further pytest args, split on
#   spaces, e.g. "-x --maxfail=3"), BENCH_TARGET_S (seconds of timed work
#   per benchmark), BENCH_PART (names a part of a split benchmark run: its files
#   are <date>-<gpu>-<part>.*; the whole run takes longer than one 10-minute call,
#   e.g. parts conv (BENCH_K="hyper or slim"), memory (BENCH_K="elementwise or restore
#   or tile"), models (BENCH_K="model or adarevd or ddsnet"), each with --no-build --no-tests after
#   the first call on a warm machine; then one report of the whole run:
#   python -m restorenet.bench_report bench/results/<date>-<gpu>-*.json --stem <date>-<gpu>),
#   TEST_TIMEOUT (seconds for the test phase, default 300; it never stops at the
#   first failure).
# Exit status: 0 when every phase that ran passed; non-zero otherwise (later
# phases still run after a test failure, so a benchmark report is still made).
set -euo pipefail

ALLOW_CPU=0 DO_BUILD=1 DO_TESTS=1 DO_BENCH=1
for arg in "$@"; do
  case "$arg" in
    --allow-cpu) ALLOW_CPU=1 ;;
    --no-build) DO_BUILD=0 ;;
    --no-tests) DO_TESTS=0 ;;
    --no-bench) DO_BENCH=0 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET
FAILED=()

section() { printf '\n==== %s ====\n' "$*"; }

section "device"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi || echo "nvidia-smi failed (exit $?)"
else
  echo "nvidia-smi: not found"
fi
HAS_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [[ "$HAS_CUDA" != 1 ]]; then
  if [[ "$ALLOW_CPU" != 1 ]]; then
    echo "gpu_check.sh: error: torch sees no CUDA device; pass --allow-cpu to run anyway" >&2
    exit 2
  fi
  echo "no CUDA device: running on CPU (--allow-cpu)"
fi

section "versions"
"$PY" - <<'PYEOF'
import importlib.metadata as md, platform, torch
print("python ", platform.python_version(), platform.machine())
print("torch  ", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
try:
    print("triton ", md.version("triton"))
except md.PackageNotFoundError:
    print("triton  not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device ", torch.cuda.get_device_name(0), f"| sm_{p.major}{p.minor}", f"| {p.multi_processor_count} SMs",
          f"| {p.total_memory / 2**30:.1f} GiB")
PYEOF
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2 || echo "nvcc: not found"

SLUG="$("$PY" -c '
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))')"
STEM="$(date +%F)-${SLUG}"
# A benchmark run split over several calls (each under the device's 10-minute
# limit) names its part: BENCH_PART=conv BENCH_K="hyper or slim" ...
BSTEM="$STEM${BENCH_PART:+-$BENCH_PART}"
RESULTS="$REPO/bench/results"
mkdir -p "$RESULTS"
echo "artifacts: $RESULTS/$STEM.*"

section "peer libraries"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl || echo "peer wheels did not install; their benchmarks skip"
else
  echo "no .whl/ folder: peer-library benchmarks (revlib) will skip with a reason"
fi

section "build"
if [[ "$DO_BUILD" == 1 && "$HAS_CUDA" == 1 ]]; then
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c '
import torch
major, minor = torch.cuda.get_device_capability(0)
print(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else ""))')"
  fi
  export TORCH_CUDA_ARCH_LIST
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  BUILD_LOG="$RESULTS/$STEM-build.log"
  set +e
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tee "$BUILD_LOG"
  rc=${PIPESTATUS[0]}
  if [[ $rc != 0 ]]; then
    echo "pip editable install failed (exit $rc); falling back to setup.py build_ext --inplace" | tee -a "$BUILD_LOG"
    "$PY" setup.py build_ext --inplace 2>&1 | tee -a "$BUILD_LOG"
    rc=${PIPESTATUS[0]}
  fi
  set -e
  if [[ $rc != 0 ]]; then
    echo "gpu_check.sh: error: the build failed (exit $rc), see $BUILD_LOG" >&2
    FAILED+=("build")
  fi
elif [[ "$DO_BUILD" == 1 ]]; then
  echo "no CUDA device: nothing to build (restorenet._C needs CUDA)"
else
  echo "skipped (--no-build)"
fi

# The package must import from this checkout, kernels/ as restorenet_kernels
# included (setup.py maps it); without an install, point PYTHONPATH at a shim.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import restorenet_kernels' 2>/dev/null; then
  SHIM="$(mktemp -d)"
  ln -s "$REPO/kernels" "$SHIM/restorenet_kernels"
  export PYTHONPATH="$PYTHONPATH:$SHIM"
  echo "restorenet_kernels not installed: using a PYTHONPATH shim ($SHIM)"
fi
"$PY" - <<'PYEOF'
import torch, restorenet
from restorenet.ops import available_backends
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("restorenet from", restorenet.__file__)
print("backends on", dev, ":", available_backends(dev))
PYEOF
if [[ "$HAS_CUDA" == 1 ]] && compgen -G "csrc/*.cu" >/dev/null; then
  if ! "$PY" -c 'import restorenet._C' ; then
    echo "gpu_check.sh: error: csrc/*.cu exist but restorenet._C does not import" >&2
    FAILED+=("extension import")
  fi
fi

section "tests"
if [[ "$DO_TESTS" == 1 ]]; then
  set +e
  # No -x: the first failure must not end what may be the only GPU run for a while;
  # -rfE lists every failure and error at the end, TEST_TIMEOUT bounds the phase.
  timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest tests -q -rfE -p no:cacheprovider 2>&1 \
      | tee "$RESULTS/$STEM-tests.log"
  rc=${PIPESTATUS[0]}
  set -e
  [[ $rc == 0 ]] || FAILED+=("tests (exit $rc)")
else
  echo "skipped (--no-tests)"
fi

section "benchmarks"
if [[ "$DO_BENCH" == 1 ]]; then
  set +e
  SELECT=()
  [[ -n "${BENCH_K:-}" ]] && SELECT=(-k "$BENCH_K")
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of pytest arguments
  "$PY" -m pytest bench/ --benchmark-only --benchmark-json="$RESULTS/$BSTEM.json" \
      -p no:cacheprovider "${SELECT[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$RESULTS/$BSTEM-bench.log"
  rc=${PIPESTATUS[0]}
  set -e
  [[ $rc == 0 ]] || FAILED+=("benchmarks (exit $rc)")
  if [[ -s "$RESULTS/$BSTEM.json" ]]; then
    "$PY" -m restorenet.bench_report "$RESULTS/$BSTEM.json" --out "$RESULTS" \
        --title "restorenet benchmarks $(date +%F)"
  else
    echo "gpu_check.sh: error: no benchmark JSON was written" >&2
    FAILED+=("report")
  fi
else
  echo "skipped (--no-bench)"
fi

if [[ -n "${OUT:-}" ]]; then
  section "copy to \$OUT"
  mkdir -p "$OUT"
  for f in "$RESULTS/$BSTEM.json" "$RESULTS/$BSTEM.md" "$RESULTS/$STEM-tests.log" \
           "$RESULTS/$BSTEM-bench.log" "$RESULTS/$STEM-build.log" "$RESULTS/$BSTEM-restore-trace.md"; do
    [[ -f "$f" ]] && cp "$f" "$OUT/"
  done
  if compgen -G "$RESULTS/$BSTEM-*.png" >/dev/null; then
    tar -czf "$OUT/$BSTEM-plots.tar.gz" -C "$RESULTS" $(cd "$RESULTS" && ls "$BSTEM"-*.png)
  fi
  ls -l "$OUT"
fi

section "summary"
if [[ -f "$RESULTS/$BSTEM.md" ]]; then
  echo "report: $RESULTS/$BSTEM.md"
fi
if (( ${#FAILED[@]} )); then
  echo "FAILED: ${FAILED[*]}" >&2
  exit 1
fi
echo "all phases passed"
