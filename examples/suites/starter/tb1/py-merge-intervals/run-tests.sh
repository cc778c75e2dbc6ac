#!/bin/bash
# Runs the task's tests; the harness mounts them at $TEST_DIR (/tests).
python -m pytest "$TEST_DIR/test_outputs.py" -rA -p no:cacheprovider
