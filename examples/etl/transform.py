"""Join sales and stock per item into out/summary.json."""

import csv
import json
import os

out = os.environ["OUT"]


def totals(name: str) -> dict[str, int]:
    result: dict[str, int] = {}
    with open(os.path.join(out, f"{name}.csv")) as f:
        for row in csv.DictReader(f):
            result[row["item"]] = result.get(row["item"], 0) + int(row["amount"])
    return result


sales, stock = totals("sales"), totals("stock")
summary = {item: {"sold": sales[item], "stock": stock.get(item, 0)} for item in sorted(sales)}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"transform ({os.environ['MODE']}): {len(summary)} items -> {out}/summary.json")
