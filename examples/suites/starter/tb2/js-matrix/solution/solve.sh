#!/bin/bash
set -euo pipefail
cd /app
cat > matrix.mjs <<'EOF'
export function transpose(m) {
  if (m.length === 0) return [];
  return m[0].map((_, j) => m.map((row) => row[j]));
}

export function multiply(a, b) {
  if (a.length === 0 || a[0].length !== b.length) {
    throw new Error(`cannot multiply: inner dimensions ${a[0]?.length} and ${b.length} differ`);
  }
  const bt = transpose(b);
  return a.map((row) => bt.map((col) => row.reduce((s, x, k) => s + x * col[k], 0)));
}
EOF
