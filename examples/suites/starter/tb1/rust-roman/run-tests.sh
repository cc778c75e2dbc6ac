#!/bin/bash
# Compile the test crate (it includes /app/roman.rs) with rustc and run it.
out=$(mktemp -d)
rustc --edition 2021 --test "$TEST_DIR/roman_test.rs" -o "$out/t" && "$out/t"
