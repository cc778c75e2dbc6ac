#!/bin/bash
set -euo pipefail
cd /app
grep -h " ERROR " logs/*.log | awk '{print $3}' | sort | uniq -c \
  | awk '{print $2, $1}' | sort -k2,2nr -k1,1 > report.txt
