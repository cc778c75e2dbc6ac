#!/bin/bash
# Verifier: node's built-in test runner; reward 1 when every test passes.
mkdir -p /logs/verifier
if node --test "$TEST_DIR"/*.test.*; then
  echo 1 > /logs/verifier/reward.txt
else
  echo 0 > /logs/verifier/reward.txt
fi
