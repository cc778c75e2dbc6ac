#!/bin/bash
# node's built-in test runner; exit 0 only when every test passes.
node --test "$TEST_DIR/slugify.test.js"
