#!/bin/bash
# Verifier: compile the test crate (it includes /app's source) with rustc and run it.
mkdir -p /logs/verifier
out=$(mktemp -d)
if rustc --edition 2021 --test "$TEST_DIR/brackets_test.rs" -o "$out/t" && "$out/t"; then
  echo 1 > /logs/verifier/reward.txt
else
  echo 0 > /logs/verifier/reward.txt
fi
