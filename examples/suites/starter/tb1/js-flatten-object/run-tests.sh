#!/bin/bash
node --test "$TEST_DIR/flatten.test.mjs"
