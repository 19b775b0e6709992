#!/usr/bin/env bash
# Build zmqfork's C module with AddressSanitizer and UndefinedBehaviorSanitizer
# into a temporary copy of the package, prove that the sanitizers report in
# this setup, run the test suite against the module, and fail on any report
# (from the test process or any child it forked).
#
#   tools/sanitize.sh [pytest args...]     (default: the whole suite but test_arch.py, stress counts lowered)
#
# tests/test_arch.py is left out by default: it never loads the Python module
# (it builds and runs its own drivers, natively and under qemu-aarch64), and
# with libasan preloaded into qemu, a host program, its aarch64 runs failed 2
# times in 3 (zmqfork_init: ENOMEM) where they pass without the preload.
#
# The build is the normal one (csrc/build_native.py, with -Werror:
# ZMQFORK_STRICT_BUILD=1) plus the sanitizer flags.  Python itself is not instrumented: libasan is
# preloaded, leak detection is off (CPython's own allocations would report),
# and every report is written to a log file, so a report in a child that exits
# through os._exit is caught too.
#
# Before the tests, a self-check (it runs every time):
#  - the module's code is instrumented (it calls __asan_report_*);
#  - tools/asan_forksafe.c, preloaded after libasan, keeps a fork made while
#    another thread holds the ASan allocator lock from hanging the child
#    (GCC 12's libasan has no atfork handler of its own; see that file);
#  - canaries (tools/sanitizer_canary.c, built with the module's flags into a
#    throwaway module) make a heap overflow (in this process and in a child of
#    each fork kind), a use after free, a global and a stack overflow and an
#    oversized shift, with zmqfork loaded and libzmq running; each must be
#    reported, through the same check as the test run, and the clean canary
#    must not be.  (A canary's error must survive -O1: see sanitizer_canary.c.)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
python="${PYTHON:-python}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== sanitizer build (ASan + UBSan) in $work"
cp -r src/zmqfork "$work/zmqfork"
rm -f "$work"/zmqfork/_native_c*.so
export ZMQFORK_STRICT_BUILD=1
export CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
export LDFLAGS="-fsanitize=address,undefined"
# From $work: the build script then names its sources by absolute path (cffi compiles in its tmpdir).
# The canary module gets the module's compile arguments and the same CFLAGS.
(cd "$work" && "$python" - "$work" "$root/csrc/build_native.py" "$root/tools") <<'EOF'
import os, runpy, sys, tempfile
from pathlib import Path

from cffi import FFI

out, tools = Path(sys.argv[1]), Path(sys.argv[3])
script = runpy.run_path(sys.argv[2])
built = Path(script["ffibuilder"].compile(tmpdir=tempfile.mkdtemp(dir=out), verbose=False))
target = out / "zmqfork" / built.name
os.replace(built, target)
print("built", target)

canary = FFI()
canary.cdef((tools / "sanitizer_canary.h").read_text())
canary.set_source(
    "zmqfork_sanitizer_canary",
    '#include <stddef.h>\n#include "sanitizer_canary.h"\n',
    sources=[str(tools / "sanitizer_canary.c")],
    include_dirs=[str(tools)],
    extra_compile_args=script["compile_args"],
)
built = Path(canary.compile(tmpdir=tempfile.mkdtemp(dir=out), verbose=False))
os.replace(built, out / built.name)
EOF
unset CFLAGS LDFLAGS
gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o "$work/asan_forksafe.so" tools/asan_forksafe.c
gcc -O1 -pthread -Wall -Wextra -Werror -DASAN_FORKSAFE_SELFTEST -o "$work/asan_forksafe_selftest" tools/asan_forksafe.c

module="$(ls "$work"/zmqfork/_native_c*.so)"
# Whole outputs, not pipes into grep -q: grep stops at the first match, and pipefail would count nm's SIGPIPE.
if [[ "$(ldd "$module")" != *libasan* ]] || [[ "$(nm -D "$module")" != *" U __asan_report_load"* ]]; then
    echo "sanitize: $module is not linked with libasan or not instrumented" >&2
    exit 1
fi

libasan="$(gcc -print-file-name=libasan.so)"
export LD_PRELOAD="$libasan $work/asan_forksafe.so"
asan_options="detect_leaks=0:halt_on_error=1:abort_on_error=0"
ubsan_options="halt_on_error=1:print_stacktrace=1"
export ASAN_OPTIONS="$asan_options" UBSAN_OPTIONS="$ubsan_options" # and a log_path for each run below
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
# The long tests with lower counts: the point here is the C code's paths, not the load.
export ZMQFORK_STORM_MESSAGES="${ZMQFORK_STORM_MESSAGES:-20000}"
export ZMQFORK_STORM_CHILDREN="${ZMQFORK_STORM_CHILDREN:-30}"
export ZMQFORK_RACE_FORKS="${ZMQFORK_RACE_FORKS:-60}"
# Still past the chain's ulimit -n 1024; 4096 generations take over 5 minutes here.
export ZMQFORK_CHAIN_GENERATIONS="${ZMQFORK_CHAIN_GENERATIONS:-1100}"
# 600 model examples take about 110 s here under ASan; 200 keep the step near 2 minutes.
export ZMQFORK_MODEL_EXAMPLES="${ZMQFORK_MODEL_EXAMPLES:-200}"

# reported DIR: a sanitizer report is in DIR's report files or in DIR/output.
reported() {
    compgen -G "$1/report*" >/dev/null || grep -qE "runtime error:|ERROR: (Address|Undefined)" "$1/output"
}

# under_sanitizers DIR COMMAND...: run COMMAND with the sanitizers logging to DIR/report.*,
# its output in DIR/output; returns COMMAND's status.
under_sanitizers() {
    local dir="$1"
    shift
    mkdir -p "$dir"
    ASAN_OPTIONS="$asan_options:log_path=$dir/report" UBSAN_OPTIONS="$ubsan_options:log_path=$dir/report" \
        "$@" >"$dir/output" 2>&1
}

selfcheck_failed() {
    echo "sanitize: self-check failed: $1" >&2
    cat "$2"/output "$2"/report* 2>/dev/null | head -40 >&2 || true
    exit 1
}

echo "== self-check: a fork while another thread holds the ASan allocator lock"
dir="$work/selfcheck/forksafe"
# Its own copy of the handler only: the preloaded one as well would take the locks twice.
LD_PRELOAD="$libasan" under_sanitizers "$dir" "$work/asan_forksafe_selftest" || selfcheck_failed "the child of such a fork hung or failed" "$dir"
! reported "$dir" || selfcheck_failed "the fork self-test made a sanitizer report" "$dir"

echo "== self-check: canaries must be reported, the clean one must not"
"$python" -c "import sys, zmqfork._native_c as m; assert m.__file__.startswith(sys.argv[1]), m.__file__
assert sys.argv[1] + '/asan_forksafe.so' in open('/proc/self/maps').read(), 'asan_forksafe.so is not loaded'" "$work"
canary() { # canary CASE WHERE EXPECTED (an ERE in the report, or "none")
    local dir="$work/selfcheck/$1-$2"
    under_sanitizers "$dir" "$python" tools/sanitizer_canary.py "$1" "$2" || true
    if [[ "$3" == none ]]; then
        ! reported "$dir" || selfcheck_failed "clean canary $1 ($2) was reported" "$dir"
        grep -q "^canary_$1" "$dir/output" || selfcheck_failed "clean canary $1 ($2) did not run" "$dir"
    else
        reported "$dir" || selfcheck_failed "canary $1 ($2) was not reported" "$dir"
        # grep the files, not a pipe from cat: grep -q stops early, and pipefail would count cat's SIGPIPE.
        grep -qsE "$3" "$dir"/report* "$dir/output" ||
            selfcheck_failed "canary $1 ($2) was reported, but not as /$3/" "$dir"
        grep -qs " in canary_$1 " "$dir"/report* "$dir/output" ||
            selfcheck_failed "canary $1 ($2) was reported without canary_$1 in the stack" "$dir"
    fi
    echo "   $1 ($2): ${3/none/no report}"
}
canary clean process none
canary clean os none
canary heap_overflow process "AddressSanitizer: heap-buffer-overflow"
for kind in os libc raw; do
    canary heap_overflow "$kind" "AddressSanitizer: heap-buffer-overflow"
done
canary use_after_free process "AddressSanitizer: heap-use-after-free"
canary global_overflow process "AddressSanitizer: global-buffer-overflow"
canary stack_overflow process "AddressSanitizer: stack-buffer-overflow"
canary shift_overflow process "runtime error: shift exponent 40 is too large"

echo "== tests against the sanitized module"
if (($#)); then tests=("$@"); else tests=(tests --ignore=tests/test_arch.py); fi
# --capture=sys: the sanitizer runtimes write to descriptor 2, which then stays
# the real stderr, so a report is seen even when it kills the process that made it.
status=0
mkdir -p "$work/tests"
ASAN_OPTIONS="$asan_options:log_path=$work/tests/report" UBSAN_OPTIONS="$ubsan_options:log_path=$work/tests/report" \
    "$python" -m pytest -q -p no:cacheprovider --capture=sys "${tests[@]}" 2>&1 | tee "$work/tests/output" || status=$?

if reported "$work/tests"; then
    echo "== sanitizer reports" >&2
    cat "$work"/tests/report* 2>/dev/null >&2 || true
    grep -E -A20 "runtime error:|ERROR: (Address|Undefined)" "$work/tests/output" >&2 || true
    exit 1
fi
echo "== no sanitizer report"
exit "$status"
