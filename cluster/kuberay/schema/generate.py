"""Regenerate ``kuberay-v1.7.0.json``: the ray.io/v1 CRD schemas, pruned for offline checks.

tests/test_cluster.py validates our KubeRay manifests against the field names and types of the
real CRDs (a typo such as ``enableInTreeAutoScaling`` is silently dropped by the API server,
so the test makes it an error). The full CRDs are ~4 MB, almost all of it the embedded
Kubernetes PodTemplateSpec/Service schemas; this script keeps the KubeRay part and replaces
those embedded core types with ``{"type": "object"}`` (the test checks pod templates itself).

    git clone --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
    python cluster/kuberay/schema/generate.py /tmp/kuberay/ray-operator/config/crd/bases
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

KUBERAY_VERSION = "v1.7.0"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml"}
# Fields whose type is a Kubernetes core object, not KubeRay's.
CORE_TYPES = {"template", "submitterPodTemplate", "headService", "serveService"}
# Where one RayClusterSpec is embedded in the other kinds; stored once under $defs.
CLUSTER_SPEC_AT = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}


def prune(node):
    """Drop descriptions and replace embedded core-object schemas (recursively)."""
    if isinstance(node, list):
        return [prune(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: ({"type": "object", "x-pruned": "kubernetes core type"}
                               if name in CORE_TYPES else prune(sub))
                        for name, sub in value.items()}
        else:
            out[key] = prune(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd_dir", type=Path, help="ray-operator/config/crd/bases of a kuberay checkout")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name(
        f"kuberay-{KUBERAY_VERSION}.json"))
    args = p.parse_args()

    schema = {"kuberay_version": KUBERAY_VERSION, "apiVersion": "ray.io/v1", "$defs": {},
              "kinds": {}}
    for kind, fname in CRDS.items():
        crd = yaml.safe_load((args.crd_dir / fname).read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        spec = prune(v1["schema"]["openAPIV3Schema"]["properties"]["spec"])
        if kind == "RayCluster":
            schema["$defs"]["RayClusterSpec"] = spec
            spec = {"$ref": "#/$defs/RayClusterSpec"}
        else:
            spec["properties"][CLUSTER_SPEC_AT[kind]] = {"$ref": "#/$defs/RayClusterSpec"}
        schema["kinds"][kind] = spec
    args.out.write_text(json.dumps(schema, indent=None, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
