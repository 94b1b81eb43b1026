"""Plan scale: planning once per build and loading the stored plan, against re-planning.

Synthetic utterance lists (no audio: ``Utterance`` records built directly; 2,000 speakers,
2-16 s each, 6 variants per utterance, 400/40/40 rooms x 5 placements, diffuse method,
float16 store with 16,384-frame shards, as a LibriSpeech-960-sized recipe would have). Per
size, each step runs in a fresh process, timed inside it, with its peak RSS (ru_maxrss):

- **plan**: ``make_plan`` on the utterance list, once per build (the flow's plan task), and
  storing the plan (``Plan.to_stored``, the bytes of ``_build/plan.npz``);
- **load**: what a worker does now: ``load_plan`` from the store, then one shard's examples
  and their utterances (what a render task reads first);
- **re-plan (old path)**: what every worker and the watcher did before: the inputs file
  (``plan.json``: manifest and corpus scan) parsed and planned again, with this code and,
  with ``--before REV``, with the code of that git revision (its ``make_plan`` as it was).

Goals (issue 14): planning 1 M examples <= 60 s and <= 2 GB; loading the stored plan in a
worker <= 5 s.

    python benchmarks/plan_scale.py [--examples 10000,100000,1000000] [--before 2ec919b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEAKERS = 2000
VARIANTS = 6


def manifest_data() -> dict:
    return {
        "name": "plan-scale",
        "seed": 14,
        "corpus": {"kind": "folder", "path": "/corpus", "pattern": "**/*.flac"},
        "variants_per_utterance": VARIANTS,
        "rooms": {
            "rooms_per_split": {"train": 400, "valid": 40, "test": 40},
            "positions_per_room": 5,
            "rt60_s": [0.3, 0.9],
        },
        "simulation": {"method": "diffuse"},
        "storage": {"dtype": "float16", "frames_per_chunk": 1024, "frames_per_shard": 16384},
    }


def utterances(n: int) -> list:
    import hashlib

    from dereverb_data.corpus import Utterance

    out = []
    for i in range(n):
        speaker = f"spk{i % SPEAKERS:04d}"
        uid = f"{speaker}-{i // SPEAKERS:05d}-{i:07d}"
        seconds = 2 + (i * 7919) % 1400 / 100  # 2-16 s, spread deterministically
        out.append(
            Utterance(
                uid,
                speaker,
                f"/corpus/{speaker}/{uid}.flac",
                hashlib.sha256(uid.encode()).hexdigest()[:24],
                int(seconds * 16000),
                16000,
                1,
            )
        )
    return out


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the steps, each run in a process of its own (``--step``) ---------------------------------


def step_plan(work: Path, n_utterances: int) -> dict:
    import time

    from dereverb_data.manifest import parse_manifest
    from dereverb_data.plan import make_plan
    from dereverb_data.store_format import PLAN_FILE

    manifest = parse_manifest(manifest_data())
    utts = utterances(n_utterances)
    before = _peak_mb()
    t0 = time.perf_counter()
    plan = make_plan(manifest, utts)
    t1 = time.perf_counter()
    data = plan.to_stored()
    t2 = time.perf_counter()
    peak = _peak_mb()
    path = work / "store" / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    (work / "plan.json").write_text(plan.to_json())  # the old path's input, not timed
    return {
        "examples": plan.n_examples,
        "shards": plan.n_shards,
        "rirs": len(plan.rirs),
        "plan_s": t1 - t0,
        "store_s": t2 - t1,
        "peak_mb": peak,
        "input_mb": before,
        "stored_mb": len(data) / 1e6,
        "plan_id": plan.plan_id,
    }


def step_load(work: Path) -> dict:
    import time

    t0 = time.perf_counter()
    from dereverb_data.build import load_plan

    t1 = time.perf_counter()
    plan = load_plan(str(work / "store"))
    examples = plan.shard_examples(0)
    _ = [plan.utterances[e.utterance_id] for e in examples]
    _ = [plan.rirs[e.rir_id] for e in examples]
    t2 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "peak_mb": _peak_mb(), "id": plan.plan_id}


def step_replan(work: Path) -> dict:
    import hashlib
    import time

    t0 = time.perf_counter()
    from dereverb_data.plan import Plan

    t1 = time.perf_counter()
    text = (work / "plan.json").read_text()
    plan = Plan.from_json(text)
    examples = plan.examples  # the old plan was a list of records; one shard's lookup needs it
    t2 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "peak_mb": _peak_mb(),
        "examples": len(examples),
        "fingerprints": hashlib.sha256(
            "".join(e.fingerprint for e in examples).encode()
        ).hexdigest()[:16],
    }


def _run(step: str, work: Path, code: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(
        [sys.executable, __file__, "--step", step, "--work", str(work), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{step} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _before_tree(rev: str, into: Path) -> Path:
    """The repository's ``dereverb_data`` at ``rev``, unpacked (its old make_plan)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "dereverb_data"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", default="10000,100000,1000000")
    parser.add_argument("--before", help="git revision whose make_plan is the old path too")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--utterances", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        work = Path(args.work)
        result = {
            "plan": lambda: step_plan(work, args.utterances),
            "load": lambda: step_load(work),
            "replan": lambda: step_replan(work),
        }[args.step]()
        print(json.dumps(result))
        return

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"load average before: {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = _before_tree(args.before, Path(tmp)) if args.before else None
        for n in (int(x) for x in args.examples.split(",")):
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            planned = _run("plan", work, REPO, "--utterances", str(n // VARIANTS))
            loaded = _run("load", work, REPO)
            assert loaded["id"] == planned["plan_id"]
            replan = _run("replan", work, REPO)
            old = _run("replan", work, before) if before else None
            row = {"n": planned["examples"], **{f"plan_{k}": v for k, v in planned.items()}}
            row.update({f"load_{k}": v for k, v in loaded.items()})
            row.update({f"replan_{k}": v for k, v in replan.items()})
            if old is not None:
                assert old["fingerprints"] == replan["fingerprints"], "plans differ"
                row.update({f"old_{k}": v for k, v in old.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"load average after: {os.getloadavg()}\n")
    head = (
        "| examples | shards | RIRs | plan s | plan peak RSS MB | store plan s | stored MB "
        "| worker load s (RSS MB) | re-plan in worker, this code s (RSS MB) |"
    )
    sep = "|---" * 9 + "|"
    if args.before:
        head += f" re-plan, code of {args.before} s (RSS MB) | load vs old re-plan |"
        sep += "---|---|"
    print(head)
    print(sep)
    for r in rows:
        line = (
            f"| {r['n']:,} | {r['plan_shards']:,} | {r['plan_rirs']:,} | {r['plan_plan_s']:.1f} "
            f"| {r['plan_peak_mb']:.0f} | {r['plan_store_s']:.2f} | {r['plan_stored_mb']:.1f} "
            f"| {r['load_load_s']:.2f} ({r['load_peak_mb']:.0f}) "
            f"| {r['replan_load_s']:.1f} ({r['replan_peak_mb']:.0f}) |"
        )
        if args.before:
            line += (
                f" {r['old_load_s']:.1f} ({r['old_peak_mb']:.0f}) "
                f"| {r['old_load_s'] / r['load_load_s']:.0f}x |"
            )
        print(line)


if __name__ == "__main__":
    main()
