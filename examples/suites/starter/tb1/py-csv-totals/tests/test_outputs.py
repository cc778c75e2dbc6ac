import csv
import json
from collections import defaultdict


def expected():
    sums = defaultdict(float)
    with open("/app/sales.csv") as fh:
        for row in csv.DictReader(fh):
            sums[row["region"]] += float(row["amount"])
    return {k: round(v, 2) for k, v in sorted(sums.items())}


def test_totals_match():
    with open("/app/totals.json") as fh:
        got = json.load(fh)
    assert got == expected()


def test_keys_sorted():
    with open("/app/totals.json") as fh:
        text = fh.read()
    keys = list(json.loads(text))
    assert keys == sorted(keys)
