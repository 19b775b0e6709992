#!/usr/bin/env bash
# Build zmqfork's C module with AddressSanitizer and UndefinedBehaviorSanitizer
# into a temporary copy of the package, run the test suite against it, and fail
# on any sanitizer report (from the test process or any child it forked).
#
#   tools/sanitize.sh [pytest args...]     (default: the whole suite, stress counts lowered)
#
# The build is the normal one (csrc/build_native.py, -Wall -Wextra -Werror)
# plus the sanitizer flags.  Python itself is not instrumented: libasan is
# preloaded, leak detection is off (CPython's own allocations would report),
# and every report is written to a log file, so a report in a child that exits
# through os._exit is caught too; UBSan, which prints to stderr, is caught in
# the output.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
python="${PYTHON:-python}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== sanitizer build (ASan + UBSan) in $work"
cp -r src/zmqfork "$work/zmqfork"
rm -f "$work"/zmqfork/_native_c*.so
export CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
export LDFLAGS="-fsanitize=address,undefined"
# From $work: the build script then names its sources by absolute path (cffi compiles in its tmpdir).
(cd "$work" && "$python" - "$work" "$root/csrc/build_native.py") <<'EOF'
import os, runpy, sys, tempfile
from pathlib import Path

out = Path(sys.argv[1])
ffibuilder = runpy.run_path(sys.argv[2])["ffibuilder"]
built = Path(ffibuilder.compile(tmpdir=tempfile.mkdtemp(dir=out), verbose=False))
target = out / "zmqfork" / built.name
os.replace(built, target)
print("built", target)
EOF
unset CFLAGS LDFLAGS
module="$(ls "$work"/zmqfork/_native_c*.so)"
if [[ "$(ldd "$module")" != *libasan* ]]; then
    echo "sanitize: $module is not linked with libasan" >&2
    exit 1
fi

libasan="$(gcc -print-file-name=libasan.so)"
export LD_PRELOAD="$libasan"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$work/report"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$work/report"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
# The long tests with lower counts: the point here is the C code's paths, not the load.
export ZMQFORK_STORM_MESSAGES="${ZMQFORK_STORM_MESSAGES:-20000}"
export ZMQFORK_STORM_CHILDREN="${ZMQFORK_STORM_CHILDREN:-30}"
export ZMQFORK_RACE_FORKS="${ZMQFORK_RACE_FORKS:-60}"

"$python" -c "import sys, zmqfork._native_c as m; assert m.__file__.startswith(sys.argv[1]), m.__file__" "$work"

echo "== tests against the sanitized module"
# --capture=sys: the sanitizer runtimes write to descriptor 2, which then stays
# the real stderr, so a report is seen even when it kills the process that made it.
status=0
"$python" -m pytest -q -p no:cacheprovider --capture=sys "${@:-tests}" 2>&1 | tee "$work/output" || status=$?

if compgen -G "$work/report*" >/dev/null || grep -qE "runtime error:|ERROR: (Address|Undefined)" "$work/output"; then
    echo "== sanitizer reports" >&2
    cat "$work"/report* 2>/dev/null >&2 || true
    grep -E -A20 "runtime error:|ERROR: (Address|Undefined)" "$work/output" >&2 || true
    exit 1
fi
echo "== no sanitizer report"
exit "$status"
