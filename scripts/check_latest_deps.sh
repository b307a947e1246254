#!/usr/bin/env bash
# See dependency drift before users do: install the newest releases pyproject.toml allows into a
# throw-away venv, say which packages moved from constraints.txt, and run the smoke tests (every
# family's text-encoder LoRA trained and reloaded through diffusers, each model card's code, the
# export round trips, the quickstart recipes) on them. Not part of CI; run it before resolving an
# issue, and refresh constraints.txt (README, "Contributing") when it passes on new versions.
#
#   scripts/check_latest_deps.sh            # exit 0: the newest versions pass the smoke tests
#   KEEP_VENV=1 scripts/check_latest_deps.sh
#
# torch stays at the CPU build this machine installs from its local file (TORCH_SPEC to change it):
# a newer torch from the index is a multi-GB CUDA build.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
work="$(mktemp -d -t finetune-latest-XXXXXX)"
cleanup() { [ -n "${KEEP_VENV:-}" ] && echo "venv kept: $work/venv" || rm -rf "$work"; }
trap cleanup EXIT

# pip's and setuptools' chatter only matters when the install fails.
pip_install() {
    python -m pip install --quiet "$@" 2>"$work/pip.err" && return 0
    grep -v "^WARNING: Location" "$work/pip.err" | tail -20
    return 1
}

echo "== installing the newest allowed releases into $work/venv"
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pip_install --upgrade pip
pip_install "$TORCH_SPEC" || { echo "error: could not install $TORCH_SPEC"; exit 2; }
pip_install --upgrade -e ".[test]" || { echo "error: the newest releases do not install together (above)"; exit 2; }
python -m pip check || echo "warning: pip check found conflicting requirements (above)"

echo "== packages that moved from constraints.txt"
python scripts/freeze_constraints.py --diff constraints.txt
moved=$?

echo "== smoke tests on the newest releases"
HF_HUB_OFFLINE=1 python -m pytest -m smoke -q -rf -p no:cacheprovider
status=$?
if [ "$status" -eq 0 ]; then
    if [ "$moved" -ne 0 ]; then
        echo "result: the newest releases pass the smoke tests; run the whole suite on them, then refresh"
        echo "        constraints.txt (README, Contributing)"
    else
        echo "result: nothing moved, and the smoke tests pass"
    fi
else
    echo "result: the newest releases break the smoke tests above (FAILED lines name the test and the error);"
    echo "        constraints.txt still installs the tested set. Fix the code, or bound the package that"
    echo "        broke in pyproject.toml with a comment saying why and which release lifts the bound."
fi
exit "$status"
