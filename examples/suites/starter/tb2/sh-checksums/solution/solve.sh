#!/bin/bash
set -euo pipefail
cd /app
(cd files && find . -type f | LC_ALL=C sort | xargs sha256sum) > SHA256SUMS
