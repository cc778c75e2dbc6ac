#!/bin/bash
set -euo pipefail
cd /app
cat > intervals.py <<'EOF'
def merge(intervals):
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out
EOF
