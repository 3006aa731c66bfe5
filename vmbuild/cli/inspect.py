"""`vmbuild inspect RECIPE`: the resolved build plan, without building anything.

Shows what `vmbuild build` with the same flags would do: the base and its digest
(when cached), the components with their parameters and digests, every setting
after precedence (CLI > recipe > default) and where it came from, the outputs, the
tests, what is cached, and what would be uploaded where. Creates no disk, VM,
cache entry or AWS resource (Packer's `inspect`, osbuild's `describe`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmbuild.cli.build import add_plan_flags, load_from_args, plan_options
from vmbuild.cli.common import SubParsers, json_flag, out, verb

if TYPE_CHECKING:
    from vmbuild.plan import BuildPlan


def add_parser(sub: SubParsers) -> None:
    p = verb(sub, "inspect", cmd_inspect, "show the resolved build plan of a recipe; build nothing")
    p.add_argument("recipe", help="recipe YAML file")
    add_plan_flags(p)
    json_flag(p)


def describe(plan: BuildPlan, *, store_source: str) -> dict[str, Any]:
    """The plan as JSON-able data (what `inspect --json` prints)."""
    from vmbuild.config.recipe import UrlBase
    from vmbuild.stages import base_image

    loaded, recipe = plan.loaded, plan.loaded.recipe
    spec = recipe.base
    cached = base_image.cached_for_recipe(
        spec, loaded.base_path, mirror=plan.mirror,
        layout=base_image.layout_for(recipe.boot_mode, recipe.arch), arch=recipe.arch,
    )  # fmt: skip
    base: dict[str, Any] = {
        "spec": spec.url if isinstance(spec, UrlBase) else spec,
        "kind": "file" if loaded.base_path else "url" if isinstance(spec, UrlBase) else "built",
        "cached": cached is not None,
        "id": cached.id if cached else None,
        "sha256": cached.sha256 if cached else (spec.sha256 if isinstance(spec, UrlBase) else None),
        "path": str(cached.path) if cached else None,
        "format": cached.format if cached else None,
    }

    src = plan.sources  # precedence is decided once, in BuildPlan.create

    def setting(name: str, value: object) -> dict[str, Any]:
        return {"value": value, "source": src[name]}

    settings = {
        "backend": setting("backend", plan.backend),
        "libvirt_uri": setting("libvirt_uri", plan.libvirt_uri),
        "libvirt_network": setting("libvirt_network", plan.libvirt_network),
        "accelerator": setting("accelerator", plan.accel_mode),
        "memory": setting("memory", plan.memory),
        "cpus": setting("cpus", plan.cpus),
        "disk_size": setting("disk_size", recipe.disk_size),
        "mirror": setting("mirror", plan.mirror),
        "apt_proxy": setting("apt_proxy", plan.apt_proxy),
        "run_tests": setting("run_tests", plan.run_tests),
        "keep_on_failure": setting("keep_on_failure", plan.keep_on_failure),
        "store": {"value": str(plan.store), "source": store_source},
    }
    components = [
        {
            "name": ref.name,
            "path": str(doc.path),
            "sha256": doc.sha256,
            "description": doc.description,
            "parameters": doc.parameters,
            "phases": list(doc.phases),
        }
        for ref, doc in zip(recipe.components, plan.documents, strict=True)
    ]
    distribution = None
    if loaded.distribution is not None:
        d = loaded.distribution
        # What the AMI will be registered with: the config's, else the recipe's.
        image = d.image.for_image(recipe.boot_mode, architecture=recipe.arch)
        distribution = {
            "method": d.import_.method,
            "image": {"boot_mode": image.mode, "architecture": image.arch},
            "regions": [
                {
                    "region": r.region,
                    "name": r.name,
                    "encrypted": r.encrypted,
                    "kms_key_id": r.kms_key_id,
                    "copy": i > 0,
                }
                for i, r in enumerate(d.regions)
            ],
            "profile": d.profile,
        }
    return {
        "recipe": {
            "path": str(loaded.path), "sha256": loaded.sha256, "name": recipe.name,
            "version": recipe.version,
        },
        "base": base,
        "components": components,
        "settings": settings,
        "outputs": list(recipe.outputs),
        "tests": {
            "run": plan.run_tests, "boot": recipe.tests.boot,
            "testinfra": [str(t) for t in loaded.test_paths],
        },
        "store": str(Path(plan.store) / recipe.name / recipe.version),
        "distribution": distribution,
    }  # fmt: skip


def cmd_inspect(args: argparse.Namespace) -> int:
    from vmbuild.cli.build import is_container_recipe
    from vmbuild.errors import VmbuildError
    from vmbuild.plan import BuildPlan

    if is_container_recipe(Path(args.recipe)):
        raise VmbuildError(
            f"{args.recipe}: inspect shows the plan of VM recipes only; this is a container recipe",
            hint=f"vmbuild validate {args.recipe} checks it without building",
        )
    loaded = load_from_args(args)
    opts = plan_options(args)
    store_source = (
        "cli" if args.store else "environment" if "VMBUILD_STORE" in os.environ else "default"
    )
    data = describe(BuildPlan.create(loaded, opts), store_source=store_source)

    def human() -> None:
        r, b = data["recipe"], data["base"]
        print(f"recipe:     {r['name']} {r['version']}  {r['path']} (sha256:{r['sha256']})")
        state = f"cached {b['id']} sha256:{b['sha256']}" if b["cached"] else "not cached: "
        if not b["cached"]:
            state += "would be built" if b["kind"] == "built" else "would be downloaded"
        print(f"base:       {b['spec']} ({state})")
        for c in data["components"]:
            params = ", ".join(f"{k}={v}" for k, v in c["parameters"].items())
            print(f"component:  {c['name']} sha256:{c['sha256']} [{','.join(c['phases'])}]"
                  + (f" {params}" if params else ""))  # fmt: skip
        for name, s in data["settings"].items():
            value = s["value"]
            if name in ("memory", "disk_size"):
                value = f"{value / (1 << 30):g} GiB"
            print(f"setting:    {name} = {value} ({s['source']})")
        print(f"outputs:    {', '.join(data['outputs'])}")
        tests = data["tests"]
        boot = " (booted as on EC2: IMDS, no seed)" if tests["boot"] == "ec2" else ""
        print(f"tests:      {'run' + boot if tests['run'] else 'skipped'}"
              + "".join(f"\n            {t}" for t in tests["testinfra"]))  # fmt: skip
        print(f"store:      {data['store']}/<build>")
        dist = data["distribution"]
        if dist is None:
            print("upload:     none (no distribution section)")
        for region in (dist or {}).get("regions", []):
            how = "copy" if region["copy"] else dist["method"]
            print(f"upload:     {region['region']} ({how}) AMI {region['name']}")

    return out(args, data, human)
