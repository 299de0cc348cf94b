"""`kbtune kb diff` and `kbtune audit`: what changed in the KB since a version, and which versions saw
which documents. Neither loads model weights."""

from __future__ import annotations

import argparse
import json

from kbtune.project import open_project


def cmd_kb_diff(args: argparse.Namespace) -> int:
    from kbtune.updates.diff import diff_since

    change = diff_since(open_project(args.overrides), args.since)
    if args.json:
        print(json.dumps(change.to_dict(), indent=2))
        return 0
    print(f"{change.collection}: {change.summary()}")
    for kind, sign in (("added", "+"), ("changed", "~"), ("deleted", "-")):
        for doc_id in getattr(change, kind)[: args.limit]:
            print(f"  {sign} {doc_id}")
        more = len(getattr(change, kind)) - args.limit
        if more > 0:
            print(f"  ... {more} more {kind} (--json lists all)")
    if change.added or change.changed:
        print(f"update: python scripts/train.py experiment=update base_version={change.since}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from kbtune.updates.audit import Audit

    project = open_project(args.overrides)
    audit = Audit(project.store, project.kb)
    if args.document:
        rows = audit.document(args.document)
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no version's data contains document {args.document}")
        for r in rows if not args.json else []:
            print(f"{r['version']:<12} {r['split']:<9} {r['now']:<8} {r['collection']}")
        return 0
    results = audit.versions()
    if args.json:
        print(json.dumps([a.to_dict() for a in results], indent=2))
        return 0
    affected = [a for a in results if a.affected]
    print(f"{len(affected)} of {len(results)} versions were trained on documents since deleted or changed")
    for a in affected:
        print(
            f"  {a.version}: {len(a.deleted)} deleted {a.deleted[:3]}, {len(a.changed)} changed {a.changed[:3]}"
        )
    return 0
