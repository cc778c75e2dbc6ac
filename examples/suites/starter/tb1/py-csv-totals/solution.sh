#!/bin/bash
set -euo pipefail
cd /app
python - <<'EOF'
import csv, json
from collections import defaultdict
sums = defaultdict(float)
with open("sales.csv") as fh:
    for row in csv.DictReader(fh):
        sums[row["region"]] += float(row["amount"])
with open("totals.json", "w") as fh:
    json.dump({k: round(v, 2) for k, v in sorted(sums.items())}, fh)
EOF
