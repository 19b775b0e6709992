#!/usr/bin/env bash
# Build zmqfork's C module with ThreadSanitizer into tools/tsan_stress.c, a C
# program whose threads make hooked calls while other threads fork by every
# kind (fork(), _Fork(), a raw clone), prove that TSan reports in this setup
# (a canary with a deliberate data race must be reported, with its function
# in the report), then run the stress and fail on any report or failed check.
#
#   tools/tsan.sh [ROUNDS]     forks per forking thread (default 400: about 10 s here)
#
# The sources are csrc/build_native.py's SOURCES, compiled with its
# compile_args (-Werror included: ZMQFORK_STRICT_BUILD=1) and -fsanitize=thread.
# tests/native/hooktarget.c is the hooked object, built without TSan (like
# libzmq, it only makes the calls).  Every report goes to a log file, also
# from children.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
rounds="${1:-400}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

export ZMQFORK_STRICT_BUILD=1
mapfile -t flags < <("$python" - <<'PY'
import runpy
script = runpy.run_path("csrc/build_native.py")
print("\n".join(arg for arg in script["compile_args"] if arg != "-fvisibility=hidden"))
print("\n".join("csrc/" + name for name in script["SOURCES"]))
PY
)
echo "== ThreadSanitizer build of the C module (${#flags[@]} flags and sources from csrc/build_native.py)"
gcc -fsanitize=thread -g -O1 -Icsrc "${flags[@]}" tools/tsan_stress.c -o "$work/tsan_stress" -ldl -pthread
gcc -shared -fPIC -O1 -Wall -Wextra -Werror -o "$work/hooktarget.so" tests/native/hooktarget.c

# run NAME ARGS...: the stress program with TSan logging to $work/NAME/report.*, output in $work/NAME/output.
run() {
    local name="$1"
    shift
    mkdir -p "$work/$name"
    TSAN_OPTIONS="halt_on_error=0:exitcode=66:log_path=$work/$name/report" timeout 300 "$work/tsan_stress" "$@" \
        >"$work/$name/output" 2>&1
}
reported() {
    compgen -G "$1/report*" >/dev/null || grep -q "WARNING: ThreadSanitizer" "$1/output"
}

echo "== self-check: the canary's data race must be reported"
run canary --canary || true
if ! reported "$work/canary" || ! grep -qs "data race" "$work"/canary/report* ||
    ! grep -qs " canary_thread " "$work"/canary/report*; then
    echo "tsan: self-check failed: the canary race was not reported as a data race in canary_thread" >&2
    cat "$work"/canary/output "$work"/canary/report* 2>/dev/null | head -40 >&2 || true
    exit 1
fi
echo "   canary: reported"

echo "== stress: $rounds forks by each of 2 threads (fork, _Fork, raw clone) while 3 threads make hooked calls"
status=0
run stress "$work/hooktarget.so" "$rounds" || status=$?
cat "$work/stress/output"
if reported "$work/stress"; then
    echo "== ThreadSanitizer reports" >&2
    cat "$work"/stress/report* >&2 2>/dev/null || true
    exit 1
fi
if [ "$status" != 0 ]; then
    echo "tsan: the stress program failed (status $status)" >&2
    exit 1
fi
echo "== no ThreadSanitizer report"
