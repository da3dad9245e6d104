#!/usr/bin/env python3
"""Judges an Autobahn Testsuite fuzzingclient report (its index.json).

Usage: check_report.py REPORT_DIR EXPECTED_FILE

Prints one line per behavior class with its count and the case ids that are
not OK, then the unexpected cases with the testsuite's own explanation.
Exits 1 if any case FAILED (its behavior or its close behavior), or if a
NON-STRICT, INFORMATIONAL or UNIMPLEMENTED case is not listed in
EXPECTED_FILE (one case id per line; `#` starts a comment). Listed cases that
are now OK are reported as stale but do not fail the run.
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# Behaviors that pass only when the case is listed in the expectations file.
TOLERATED = ("NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED")
# Order of the summary lines.
CLASSES = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")


def case_key(case_id):
    """Sorts 9.10.1 after 9.2.1, as the testsuite numbers them."""
    return [int(part) if part.isdigit() else part for part in case_id.split(".")]


def read_expected(path):
    expected = set()
    for line in Path(path).read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            if not re.fullmatch(r"\d+(\.\d+)+", entry):
                sys.exit(f"{path}: `{entry}` is not a case id")
            expected.add(entry)
    return expected


def explain(report_dir, result):
    """The testsuite's one-line reason for a case, from its per-case report."""
    name = result.get("reportfile")
    if not name:
        return ""
    try:
        detail = json.loads((Path(report_dir) / name).read_text())
    except (OSError, ValueError):
        return ""
    reasons = [detail.get("result", ""), detail.get("resultClose", "")]
    return " / ".join(r for r in reasons if r)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    report_dir, expected_file = sys.argv[1], sys.argv[2]
    index = json.loads((Path(report_dir) / "index.json").read_text())
    expected = read_expected(expected_file)

    by_class = defaultdict(list)
    close_failed = []
    unexpected = []
    results = {}
    for agent_results in index.values():
        for case_id, result in agent_results.items():
            results[case_id] = result
            behavior = result.get("behavior", "MISSING")
            by_class[behavior].append(case_id)
            if result.get("behaviorClose") == "FAILED":
                close_failed.append(case_id)
            if behavior in TOLERATED and case_id not in expected:
                unexpected.append(case_id)

    print(f"autobahn: {len(results)} cases")
    for behavior in CLASSES + tuple(sorted(set(by_class) - set(CLASSES))):
        cases = sorted(by_class.get(behavior, []), key=case_key)
        listed = "" if behavior == "OK" or not cases else ": " + " ".join(cases)
        print(f"  {behavior:<13} {len(cases):>4}{listed}")
    listed = ": " + " ".join(sorted(close_failed, key=case_key)) if close_failed else ""
    print(f"  {'close FAILED':<13} {len(close_failed):>4}{listed}")

    stale = sorted(
        (c for c in expected if results.get(c, {}).get("behavior") == "OK"), key=case_key
    )
    if stale:
        print("expected non-strict but now OK (remove from the list): " + " ".join(stale))
    missing = sorted((c for c in expected if c not in results), key=case_key)
    if missing:
        print("expected non-strict but not run: " + " ".join(missing))

    unknown = [c for b in set(by_class) - set(CLASSES) for c in by_class[b]]
    bad = sorted(set(by_class.get("FAILED", []) + close_failed + unexpected + unknown), key=case_key)
    # The plain closing line CI logs are read for: N passed, N failed.
    verdict = f"autobahn: {len(results) - len(bad)} passed, {len(bad)} failed"
    if not bad:
        print(verdict)
        return 0
    print(f"autobahn: {len(bad)} unexpected case(s):")
    for case_id in bad:
        result = results.get(case_id, {})
        print(
            f"  {case_id}: {result.get('behavior')} (close {result.get('behaviorClose')}, "
            f"remote code {result.get('remoteCloseCode')}) {explain(report_dir, result)}"
        )
    print(verdict)
    return 1


if __name__ == "__main__":
    sys.exit(main())
