# CI matrix cells, sourced by .ci/run (bash; needs $work, a scratch directory, and the project root as cwd).
#
# A cell is one fresh venv with zmqfork installed by the README's command
# (`pip install '.[test]'`, plus the pins the cell is about), and one pytest
# run in it with CI=true, so that tests/skipguard.py fails it on a skip the
# allow-list does not give a reason for.  Each cell prints exactly one line,
#     cell NAME: N passed, N failed, N skipped in S s
# (plus ", N xfailed" when some were), or "cell NAME: FAILED (why) in S s" when
# it broke before its tests; a
# failed cell does not stop the others: matrix_verdict, at the end, fails the
# run if any cell failed.  Install and pytest output go to a log per cell,
# shown when the cell fails.
#
# Kinds of cell:
#   cell_full NAME PYTHON ARGS...   pytest ARGS (the full suite) with an interpreter .ci/run set up
#   cell_python X.Y                 the fast suite on CPython X.Y (newest X.Y.* under pyenv)
#   cell_pyzmq_wheel VERSION        the fast suite on CPython 3.11 with pyzmq==VERSION from its wheel
#   cell_pyzmq_source VERSION       the same with pyzmq==VERSION built from source against the system libzmq
# The fast suite is .ci/fast-suite (one pytest argument per line).

CELLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"  # .ci/, wherever the caller stands
PYENV_VERSIONS="${PYENV_ROOT:-$HOME/.pyenv}/versions"
FAST_SUITE_ENV=(ZMQFORK_CHAIN_GENERATIONS=300)
cells_failed=()
cell_start=0

# The one summary line of a cell; records a failed cell.  summarise NAME STATUS REPORT|-WHY
summarise() {
    local seconds=$((SECONDS - cell_start))
    if ! python3 "$CELLS_DIR/cell_summary.py" "$1" "$seconds" "$2" "$3"; then
        cells_failed+=("$1")
        [ -f "$work/cells/$1.log" ] && tail -n 40 "$work/cells/$1.log"
    fi
    return 0
}

# A fresh venv for cell NAME with PYTHON, and `pip install ARGS...` in it.  Returns 1 (summary printed) on failure.
cell_venv() {
    local name=$1 python=$2
    shift 2
    cell_start=$SECONDS
    mkdir -p "$work/cells"
    echo "== cell $name: $python, pip install $*"
    if ! { "$python" -m venv "$work/cells/$name" && "$work/cells/$name/bin/pip" install "$@"; } \
        >"$work/cells/$name.log" 2>&1; then
        summarise "$name" 1 "-install failed"
        return 1
    fi
    if ! "$work/cells/$name/bin/python" -c 'import sys, zmq, zmqfork
assert "site-packages" in zmqfork.__file__, zmqfork.__file__
print(f"Python {sys.version.split()[0]}, pyzmq {zmq.pyzmq_version()}, libzmq {zmq.zmq_version()}, "
      f"descriptor tracking on {zmqfork.detection().fdtrack_object}")' 2>>"$work/cells/$name.log"; then
        summarise "$name" 1 "-import failed"
        return 1
    fi
}

# pytest with ARGS in the venv of cell NAME, under CI=true; prints the summary.  cell_pytest NAME [ENV=VALUE...] -- ARGS...
cell_pytest() {
    local name=$1 status=0 env=()
    shift
    while [ "$1" != "--" ]; do env+=("$1"); shift; done
    shift
    env CI=true "${env[@]}" "$work/cells/$name/bin/python" -m pytest -q -p no:cacheprovider \
        --durations=10 --junitxml="$work/cells/$name.xml" "$@" >>"$work/cells/$name.log" 2>&1 || status=$?
    summarise "$name" "$status" "$work/cells/$name.xml"
}

cell_fast_suite() {
    local suite
    mapfile -t suite < <(grep -v -e '^#' -e '^[[:space:]]*$' "$CELLS_DIR/fast-suite")
    cell_pytest "$1" "${FAST_SUITE_ENV[@]}" -- "${suite[@]}"
}

cell_full() {
    local name=$1 python=$2 status=0
    shift 2
    cell_start=$SECONDS
    CI=true "$python" -m pytest -q -p no:cacheprovider --junitxml="$work/$name.xml" "$@" || status=$?
    summarise "$name" "$status" "$work/$name.xml"
}

cell_python() {
    local name="python-$1" python
    python=$(ls -d "$PYENV_VERSIONS/$1".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$python" ]; then
        cell_start=$SECONDS
        summarise "$name" 1 "-no CPython $1 under $PYENV_VERSIONS"
        return
    fi
    cell_venv "$name" "$python" '.[test]' && cell_fast_suite "$name"
}

cell_pyzmq_wheel() {
    local name="pyzmq-$1"
    cell_venv "$name" python3 --only-binary pyzmq '.[test]' "pyzmq==$1" && cell_fast_suite "$name"
}

# Debian's libzmq3-dev provides the system libzmq; the cell checks that pyzmq's backend uses it.
cell_pyzmq_source() {
    local name="pyzmq-$1-source" system
    cell_start=$SECONDS
    if ! system=$(pkg-config --modversion libzmq 2>/dev/null); then
        summarise "$name" 1 "-no system libzmq: pkg-config knows no libzmq (Debian: apt-get install libzmq3-dev)"
        return
    fi
    cell_venv "$name" python3 --no-binary pyzmq '.[test]' "pyzmq==$1" || return 0
    if ! "$work/cells/$name/bin/python" - "$system" <<'EOF' >>"$work/cells/$name.log" 2>&1; then
import sys, zmq, zmqfork
hooked = zmqfork.detection().fdtrack_object or ""
assert zmq.zmq_version() == sys.argv[1], f"pyzmq runs libzmq {zmq.zmq_version()}, the system has {sys.argv[1]}"
assert hooked.startswith("/usr/lib/"), f"descriptor tracking hooked {hooked!r}, not the system libzmq"
EOF
        summarise "$name" 1 "-pyzmq does not use the system libzmq $system"
        return
    fi
    cell_fast_suite "$name"
}

matrix_verdict() {
    if ((${#cells_failed[@]})); then
        echo "matrix: ${#cells_failed[@]} cell(s) failed: ${cells_failed[*]}"
        return 1
    fi
    echo "matrix: every cell passed"
}
