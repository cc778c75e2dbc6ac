#!/bin/bash
# Verifier: run the tests, write the reward (1 = all passed) where the harness reads it.
mkdir -p /logs/verifier
if python -m pytest "$TEST_DIR/test_outputs.py" -rA -p no:cacheprovider; then
  echo 1 > /logs/verifier/reward.txt
else
  echo 0 > /logs/verifier/reward.txt
fi
