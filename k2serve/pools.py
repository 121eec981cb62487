"""``k2serve pools``: look at and resize the worker pools of a running cluster (the operator's handle).

Lifecycle: connect to the cluster's Ray (``--address``, default ``auto``: the Ray instance of this
node, e.g. inside the head pod) in ``--namespace`` -> find the controller actor by name -> one
bounded call -> print the answer as JSON -> disconnect. The controller must outlive its driver for
this to work from another process: ``k2serve cluster`` on a head node keeps it alive while it runs.

    k2serve pools status                      # one line per group: state, restarts, last error
    k2serve pools scale decode 3              # desired groups of the decode pool (drains removed ones)
    k2serve pools drain prefill 0             # drain a group and replace it with a fresh one
    k2serve pools decisions                   # the autoscaler's recent decisions and why (docs/PLANNING.md)

Exit status: 0 done, 1 the controller refused (unknown pool, group not ready), 2 bad flags.
"""

from __future__ import annotations

import argparse
import json


def run_pools(args: argparse.Namespace) -> int:
    from k2serve.cluster.config import RaySettings  # ray: only when the command runs
    from k2serve.cluster.controller_handle import ControllerHandle
    from k2serve.cluster.ray_runtime import RayRuntime

    runtime = RayRuntime.start(RaySettings(address=args.address, namespace=args.namespace, auth=args.ray_auth))
    try:
        controller = ControllerHandle.connect(args.namespace)
        if args.action == "status":
            answer: object = {"desired": controller.desired(), "groups": controller.status()}
        elif args.action == "decisions":
            answer = {"decisions": controller.autoscaler_decisions()[-args.last :]}
        elif args.action == "scale":
            answer = {"desired": controller.scale(args.pool, args.groups, grace_s=args.grace)}
        else:
            answer = {"drained": controller.drain(args.pool, args.group, grace_s=args.grace)}
        print(json.dumps(answer, indent=2, default=str))
        return 1 if answer == {"drained": False} else 0
    except ValueError as exc:
        print(f"k2serve pools: {exc}")
        return 1
    finally:
        runtime.shutdown()


def add_pools_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pools", help="status, scale or drain the worker pools of a running cluster")
    p.add_argument("--address", default="auto", help="Ray address of the cluster (default: this node's)")
    p.add_argument("--namespace", default="k2serve", help="the cluster's Ray namespace (ray.namespace)")
    p.add_argument("--ray-auth", choices=("token", "disabled"), default="token", help="the cluster's ray.auth")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get on a drained group")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="desired group counts and every group's state")
    scale = actions.add_parser("scale", help="set a pool's desired number of groups")
    scale.add_argument("pool")
    scale.add_argument("groups", type=int)
    decisions = actions.add_parser("decisions", help="the autoscaler's recent decisions (empty when it is off)")
    decisions.add_argument("--last", type=int, default=50, help="how many, newest last")
    drain = actions.add_parser("drain", help="drain one group and replace it")
    drain.add_argument("pool")
    drain.add_argument("group", type=int)
    p.set_defaults(func=run_pools)
