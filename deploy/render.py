"""Render a kustomize overlay offline (the subset deploy/k8s uses), without kubectl.

    python deploy/render.py deploy/k8s/overlays/gpu > gpu.yaml

Supports ``resources`` (files and directories with a kustomization), ``images``
(newName/newTag), ``replicas`` (name/count) and ``patches`` (strategic merge: maps merge, a
null value deletes the key, lists of named items merge by ``name``, other lists are
replaced).  ``tests/test_deploy.py`` checks the output equals
``kubectl kustomize`` where kubectl exists.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["render"]

_MERGE_KEYS = ("name", "key", "containerPort", "mountPath")


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = next(
            (
                k
                for k in _MERGE_KEYS
                if patch and all(isinstance(i, dict) and k in i for i in base + patch)
            ),
            None,
        )
        if key is None:
            return copy.deepcopy(patch)
        out = list(base)
        new = []  # like kustomize: items only in the patch come first, in patch order
        for item in patch:
            idx = next((i for i, b in enumerate(out) if b[key] == item[key]), None)
            if idx is None:
                new.append(copy.deepcopy(item))
            else:
                out[idx] = _merge(out[idx], item)
        return new + out
    return copy.deepcopy(patch)


def _images(doc: Any, images: list[dict[str, str]]) -> None:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                for c in v:
                    name = c.get("image", "").split(":")[0]
                    for img in images:
                        if img["name"] == name:
                            c["image"] = f"{img.get('newName', name)}:{img['newTag']}"
            else:
                _images(v, images)
    elif isinstance(doc, list):
        for v in doc:
            _images(v, images)


def render(directory: str | Path) -> list[dict[str, Any]]:
    d = Path(directory)
    kust = yaml.safe_load((d / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        p = d / res
        if p.is_dir():
            docs += render(p)
        else:
            docs += [x for x in yaml.safe_load_all(p.read_text()) if x]
    for patch in kust.get("patches", []):
        for pd in yaml.safe_load_all((d / patch["path"]).read_text()):
            target = (pd["kind"], pd["metadata"]["name"])
            hits = [i for i, x in enumerate(docs) if (x["kind"], x["metadata"]["name"]) == target]
            if not hits:
                raise ValueError(f"patch {patch['path']}: no {target} in the resources")
            for i in hits:
                docs[i] = _merge(docs[i], pd)
    _images(docs, kust.get("images", []))
    for r in kust.get("replicas", []):
        for doc in docs:
            if doc["metadata"]["name"] == r["name"] and "replicas" in doc.get("spec", {}):
                doc["spec"]["replicas"] = r["count"]
    return docs


if __name__ == "__main__":
    print(yaml.safe_dump_all(render(sys.argv[1]), sort_keys=False), end="")
