"""Put more demand on a Ray cluster than its head can hold, and report how the cluster grew.

A stand-in for the priors stage (an actor pool, one model per GPU) next to data-preparation
tasks, used to check that an autoscaling cluster adds the right worker types and that a job
finishes on them. Submit it like any job:

    ray job submit --address http://127.0.0.1:8295 -- \
        python cluster/demand.py --actors 2 --gpus-per-actor 1 --tasks 1 --cpus-per-task 2

It prints one line ``PGASR_DEMAND_RESULT {json}``: alive nodes before and at the peak
(``ray.nodes()``), the role of each node that ran work (its ``pgasr/role`` label) and the
seconds until all of it had run.
Exits non-zero if the work has not run within ``--timeout-s``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import ray

# The launcher gives every node the `labels` of its node type (cluster/*.yaml); ours carry
# the role, which tells a GPU node from a data node without knowing the provider.
ROLE_LABEL = "pgasr/role"


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def node_role(labels: dict) -> str:
    """The role of the node a unit of work ran on ("head" for the unlabelled head)."""
    return labels.get(ROLE_LABEL, "head")


@ray.remote
class PriorStandIn:
    """Holds a slot the way a prior actor holds its GPU; `run` does a little work."""

    def run(self, work_s: float) -> dict:
        time.sleep(work_s)
        ctx = ray.get_runtime_context()
        return {"kind": "actor", "node_id": ctx.get_node_id(), "labels": ctx.get_node_labels()}


@ray.remote
def data_task(work_s: float) -> dict:
    time.sleep(work_s)
    ctx = ray.get_runtime_context()
    return {"kind": "task", "node_id": ctx.get_node_id(), "labels": ctx.get_node_labels()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--actors", type=int, default=2, help="prior stand-in actors")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--tasks", type=int, default=0, help="data tasks")
    p.add_argument("--cpus-per-task", type=float, default=2.0)
    p.add_argument("--work-s", type=float, default=2.0, help="seconds each unit of work sleeps")
    p.add_argument("--timeout-s", type=float, default=120.0)
    args = p.parse_args(argv)

    ray.init()
    t0 = time.monotonic()
    before = len(alive_nodes())
    peak = before

    actors = [PriorStandIn.options(num_cpus=args.cpus_per_actor, num_gpus=args.gpus_per_actor)
              .remote() for _ in range(args.actors)]
    pending = [a.run.remote(args.work_s) for a in actors]
    pending += [data_task.options(num_cpus=args.cpus_per_task).remote(args.work_s)
                for _ in range(args.tasks)]
    results = []
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        results += ray.get(done)
        peak = max(peak, len(alive_nodes()))
        if pending and time.monotonic() - t0 > args.timeout_s:
            print(f"demand.py: {len(pending)} of {args.actors + args.tasks} units not done "
                  f"after {args.timeout_s:.0f} s; alive nodes: {len(alive_nodes())}",
                  file=sys.stderr)
            return 1
    done_s = time.monotonic() - t0
    for a in actors:
        ray.kill(a)  # release the slots now, so idle-timeout starts counting

    out = {
        "nodes_before": before,
        "nodes_peak": peak,
        "done_s": round(done_s, 1),
        "work": [{"kind": r["kind"], "node_id": r["node_id"], "role": node_role(r["labels"])}
                 for r in results],
    }
    print("PGASR_DEMAND_RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
