"""Prefect deployments for a store: a scheduled build and an on-demand regenerate.

- ``build-dataset/scheduled``: the build flow on a cron schedule (default nightly at 02:00).
  On an up-to-date store it only checks: every shard has its done-marker, every RIR is in the
  bank, so nothing is redone; after a crash it finishes the build.
- ``regenerate-dataset/regenerate``: no schedule; run it after editing the manifest. It runs the
  build as a subflow against the existing store (only rooms, RIRs and shards whose specs
  changed are redone) and then reports which manifest fields changed and what was redone, as
  a log line and a markdown artifact (key ``dataset-regenerate``).

Both are served by one long-lived process, ``dereverb serve`` (``flows/cli.py``), which runs at
most one of them at a time, on a local Dask cluster it keeps for its lifetime (or
``--dask-address``; ``--workers 1``: in-process)::

    dereverb serve MANIFEST --store URL [--cron "0 2 * * *"] [--workers N]

and are triggered from anywhere that reaches the same Prefect API::

    prefect deployment run regenerate-dataset/regenerate

The process needs ``PREFECT_API_URL`` pointing at a running ``prefect server`` (runs, schedules
and logs live there). Stopping it (Ctrl-C) pauses the schedule until it is served again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments.runner import RunnerDeployment
from prefect.types.entrypoint import EntrypointType

from .build import build_dataset, run_build
from .runners import task_runner

BUILD_DEPLOYMENT = "scheduled"
REGENERATE_DEPLOYMENT = "regenerate"
DEFAULT_CRON = "0 2 * * *"


def _stored_manifest(store_url: str) -> dict | None:
    """The manifest a complete store was last built from; None if there is no such store."""
    import zarr

    from dereverb_data.store import DatasetStore

    if not DatasetStore(store_url).exists():
        return None
    attrs = dict(zarr.open_group(store_url, mode="r").attrs)
    return attrs.get("manifest") if attrs.get("complete") else None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def changed_fields(before: dict | None, after: dict | None) -> list[str]:
    """``field: old -> new`` for every manifest field that differs (dotted paths)."""
    if before is None or after is None:
        return []
    old, new = _flatten(before), _flatten(after)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            a, b = (json.dumps(d.get(key, "<unset>"), default=str) for d in (old, new))
            lines.append(f"{key}: {a} -> {b}")
    return lines


@flow(name="regenerate-dataset", log_prints=True)
def regenerate_dataset(
    manifest_path: str,
    store_url: str,
    rir_cache: str | None = None,
    corpus_path: str | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
) -> dict:
    """Bring an existing store up to date with its (edited) manifest, and say what changed."""
    logger = get_run_logger()
    before = _stored_manifest(store_url)
    report = run_build(manifest_path, store_url, rir_cache, workers, dask_address, corpus_path)
    changes = changed_fields(before, _stored_manifest(store_url))
    counts = report["counts"]
    if before is None:
        logger.info("no complete store at %s before: built from scratch", store_url)
    logger.info("manifest changes: %s", changes or "none")
    logger.info("regenerate counts: %s", counts)
    lines = [
        f"# Regenerated `{store_url}`",
        f"Manifest: `{manifest_path}`",
        "",
        "## Manifest changes",
        "",
        *([f"- `{line}`" for line in changes] or ["- none" if before else "- new store"]),
        "",
        "## Work",
        "",
        "| what | redone | kept |",
        "|---|---|---|",
        f"| RIRs | {counts['rirs_simulated']} | {counts['rirs_reused']} |",
        f"| shards | {counts['shards_rendered']} | {counts['shards_kept']} |",
    ]
    if "examples_rendered" in counts:
        lines.append(
            f"| examples | {counts['examples_rendered']} | {counts.get('examples_kept', 0)} |"
        )
    create_markdown_artifact(
        key="dataset-regenerate",
        markdown="\n".join(lines),
        description=f"Regeneration of {store_url}",
    )
    return {"changes": changes, "counts": counts, "summary": report["summary"]}


def deployments(
    manifest_path: str,
    store_url: str,
    cron: str | None = DEFAULT_CRON,
    workers: int | None = None,
    dask_address: str | None = None,
) -> list[RunnerDeployment]:
    """The scheduled build (``cron``; None for no schedule) and the on-demand regenerate.

    ``workers``/``dask_address`` choose where the mapped tasks run, as for ``dereverb build``.
    A local manifest path is made absolute: served runs may start in another folder.
    """
    if "://" not in manifest_path:
        manifest_path = str(Path(manifest_path).resolve())
    common = {"manifest_path": manifest_path, "store_url": store_url}
    build = build_dataset.with_options(task_runner=task_runner(workers, dask_address))
    return [
        build.to_deployment(
            name=BUILD_DEPLOYMENT,
            cron=cron,
            parameters=common,
            description=f"Build or resume {store_url} from {manifest_path}",
            tags=["dereverb"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
        regenerate_dataset.to_deployment(
            name=REGENERATE_DEPLOYMENT,
            parameters={**common, "workers": workers, "dask_address": dask_address},
            description=f"Update {store_url} after a change of {manifest_path}",
            tags=["dereverb"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    ]
