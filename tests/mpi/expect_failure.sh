#!/usr/bin/env bash
# expect_failure.sh NP MPIRUN_PREFIX... -- PROGRAM TP PP DP [MODE]
# Passes when the run ends, non-zero and with the expected message (the
# editing function's, or EXPECTED_MESSAGE), within 60 s: every rank ended (the
# failing stage's ranks report the message, a rank of another stage is ended
# by the world's abort). With EXPECTED_REPORTS=K, at least K ranks must report
# "ended: ...<message>" themselves (the error reached them, not only the abort).
set -u
np=$1
shift
start=$(date +%s)
output=$(timeout 60 "$@" 2>&1)
status=$?
elapsed=$(($(date +%s) - start))
echo "$output"
if ((status == 124)); then echo "FAIL: still running after 60 s (a hang)"; exit 1; fi
if ((status == 0)); then echo "FAIL: the run succeeded"; exit 1; fi
needle=${EXPECTED_MESSAGE:-probe diverged}
reported=$(grep -c -- "$needle" <<<"$output")
if ((reported == 0)); then echo "FAIL: no rank reported '$needle'"; exit 1; fi
wanted=${EXPECTED_REPORTS:-0}
ended=$(grep -c -- "ended: .*$needle" <<<"$output")
if ((ended < wanted)); then echo "FAIL: $ended rank(s) reported the error, expected $wanted"; exit 1; fi
echo "PASS: all $np ranks ended in ${elapsed} s; $reported lines carry the message"
