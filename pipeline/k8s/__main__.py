"""``python -m pipeline.k8s``: ``prewarm --model M ...`` is the pre-warm DaemonSet's loop;
``daemonset --image IMG --model M ...`` prints its manifest (deploy/k8s/shm-prewarm-daemonset.yaml)."""

from __future__ import annotations

import argparse
import sys

from pipeline.k8s.manifests import model_store_access, prewarm_daemonset
from pipeline.k8s.prewarm import prewarm_loop
from pipeline.settings import json_setting, parse_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.k8s")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prewarm", help="keep the production version of each model (the promotion alias) in the node's /dev/shm tier")
    p.add_argument("--model", action="append", required=True, help="model name (repeat for several)")
    p.add_argument("--every", type=float, default=60.0, help="seconds between checks of the production alias")
    p.add_argument("--pin", action="store_true", help="protect pre-warmed versions from LRU eviction")
    p.add_argument("--ready-file", help="touched once every model has a version in the tier (readiness)")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    d = sub.add_parser("daemonset", help="print the pre-warm DaemonSet manifest (YAML) for kubectl apply")
    d.add_argument("--image", required=True)
    d.add_argument("--model", action="append", required=True)
    d.add_argument("--capacity", default="64Gi", help="tier budget per node, e.g. 64Gi, 64GiB (FORGELINE_SHM_CAPACITY_BYTES)")
    d.add_argument("--namespace")
    d.add_argument("--node-selector", default="{}", help="JSON object: the serving nodes' labels")
    d.add_argument("--tolerations", default="[]", help="JSON list of tolerations")
    d.add_argument("--s3-secret", help="Secret with FORGELINE_S3_* and AWS_* keys")
    d.add_argument("--pvc", help="model-store PVC (with --storage-root)")
    d.add_argument("--storage-root", help="where the PVC is mounted (FORGELINE_STORAGE_ROOT)")
    d.add_argument("--every", type=int, default=60)
    args = ap.parse_args(argv)
    if args.cmd == "daemonset":
        import yaml

        flags = {"--node-selector": args.node_selector, "--tolerations": args.tolerations}
        manifest = prewarm_daemonset(
            image=args.image, models=args.model, capacity_bytes=parse_size(args.capacity),
            namespace=args.namespace, every_s=args.every,
            node_selector=json_setting("--node-selector", dict, {}, flags),
            tolerations=json_setting("--tolerations", list, [], flags),
            access=model_store_access(s3_secret=args.s3_secret, pvc=args.pvc, mount_path=args.storage_root))
        print(yaml.safe_dump(manifest, sort_keys=False), end="")
        return 0
    prewarm_loop(args.model, every_s=args.every, pin=args.pin, ready_file=args.ready_file,
                 rounds=1 if args.once else None, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
