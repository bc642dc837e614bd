#!/bin/sh
# Print a small report of what was uploaded.
set -eu
echo "report for run $WFD_RUN_ID"
python3 - "$OUT/uploaded.json" <<'PY'
import json, sys
for item, v in json.load(open(sys.argv[1])).items():
    print(f"  {item:<8} sold {v['sold']:>4}  in stock {v['stock']:>4}")
PY
