#!/bin/bash
mkdir -p /logs/verifier
if python -m pytest "$TEST_DIR/test_outputs.py" -rA -p no:cacheprovider; then r=1; else r=0; fi
printf '{"reward": %s}\n' "$r" > /logs/verifier/rewards.json
