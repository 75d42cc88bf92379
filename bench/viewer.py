"""Benchmark: paging through a 100k-prompt pair set in the viewer and the v1 prompt listing
(run: python bench/viewer.py [--prompts N]).

A pair set of N prompts is written straight into a temporary store, shaped like the pipeline's output:
shard records of 500 prompts (recipe, 4 candidates each with its fp16 attention over 576 image tokens,
layouts) and the prompt index the merge writes (`core.prompts`). `miadpo api` serves it (a subprocess on
loopback, its own redis-server); the client signs in to the viewer like a browser. Each case is timed
over repeated requests: first page, a page deep in the set (cursor), a common filter (grid), a rare
filter combination far down, and the viewer's HTML page of 24 prompts. Images are not fetched (they are
rendered once per prompt and cached; tests/ui covers them).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from redis import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.services import free_port, start_redis  # noqa: E402
from core import prompts, records  # noqa: E402
from core.store import ArtifactStore  # noqa: E402

KEY = "bench-viewer-key"
FORMATS = ("sequence", "grid", "grid", "pic_in_pic", "sequence", "grid")
OUTCOMES = ("exported", "exported", "no_pair", "exported", "perplexity", "length_ratio", "no_pair", "edit_distance")
LAYOUT = {"image_size": [672, 672], "rows": 24, "cols": 24, "cell": [14, 14], "scale": [0.5, 0.5], "offset": [0, 0], "leading_tokens": 0, "fit_offset": [0, 0]}


def _record(i: int, rng: np.random.Generator) -> tuple[dict, str]:
    fmt = FORMATS[i % len(FORMATS)]
    n = 2 + (i // 7) % 4 if fmt != "pic_in_pic" else 2
    shown = n if fmt == "sequence" else 1
    attention = base64.b64encode(rng.random(576 * shown).astype("<f2").tobytes()).decode()
    outcome = OUTCOMES[i % len(OUTCOMES)]
    image = {"ref": "0" * 64, "width": 640, "height": 480, "sample_id": f"s{i % 997}"}
    rec = {
        "uid": f"0-{i:07d}",
        "recipe": {
            "uid": f"0-{i:07d}", "index": i, "seed": 0, "format": fmt, "sample_id": f"s{i % 997}",
            "question": "What colour is the square?", "answer": "The square is red.", "images": [image] * n,
            "target_index": i % n, "prompt": "<image>\n" * shown + f"In Image{i % n + 1}, what colour is the square?",
            "phrase": None,
        },
        "threshold": 0.5, "comparison": "<=", "attention_rows": "answer_tokens", "layouts": [LAYOUT] * shown,
        "candidates": [
            {"text": f"candidate {j} of {i}", "num_tokens": 6, "finish_reason": "stop", "ratio": float(rng.random()),
             "ratios": {}, "perplexity": 3.0, "official_perplexity": 3.0, "hallucinated": j == 0 and outcome != "no_pair",
             "reason": "kept", "attention": attention}
            for j in range(4)
        ],
        "rejected": None if outcome == "no_pair" else 0,
        "stats": None if outcome == "no_pair" else {"perplexity": 3.0, "length_ratio": 1.0, "edit_distance": 0.5},
    }
    return rec, outcome


def build(store: ArtifactStore, pairset_id: str, num: int, per_shard: int = 500) -> None:
    rng = np.random.default_rng(0)
    shards = store.path("pairsets", pairset_id, "shards")
    shards.mkdir(parents=True)
    index = prompts.IndexWriter()
    for s in range(0, num, per_shard):
        path = shards / f"{s // per_shard:05d}.jsonl"
        offset = 0
        with open(path, "wb") as fh:
            for i in range(s, min(s + per_shard, num)):
                rec, outcome = _record(i, rng)
                line = (json.dumps(rec) + "\n").encode()
                fh.write(line)
                index.add(s // per_shard, offset, len(line), rec, outcome)
                offset += len(line)
    index.write(prompts.index_path(store, pairset_id))


def _time(client: httpx.Client, url: str, repeat: int, **kw: object) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = client.get(url, **kw)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp:
        root = Path(tmp)
        redis_proc, url = start_redis(root / "data", port=free_port())
        api = None
        try:
            store = ArtifactStore(root / "data")
            r = Redis.from_url(url)
            owner = records.owner_of(KEY)
            rec = records.new_pairset(owner, dataset_id="ds_bench", model="tiny-llava", config={})
            rec.update(status="succeeded", stage="done", progress={"done": args.prompts, "total": args.prompts})
            records.create(r, records.PAIRSET, rec)
            t = time.perf_counter()
            build(store, rec["id"], args.prompts)
            size = sum(p.stat().st_size for p in store.path("pairsets", rec["id"], "shards").glob("*")) / 1e6
            print(f"wrote {args.prompts} prompts ({size:.0f} MB of shard records) in {time.perf_counter() - t:.1f}s; "
                  f"index {prompts.index_path(store, rec['id']).stat().st_size / 1e6:.1f} MB")
            port = free_port()
            env = {**os.environ, "MIADPO_DATA_DIR": str(root / "data"), "REDIS_URL": url, "MIADPO_REDIS_URL": url, "MIADPO_API_KEYS": KEY}
            api = subprocess.Popen([sys.executable, "-m", "cli", "api", "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the API did not start")
                time.sleep(0.2)
            page = client.get("/ui/signin")
            token = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            assert client.post("/ui/signin", data={"api_key": KEY, "csrf": token}).status_code in (200, 303)
            ps = rec["id"]
            deep = f"0-{int(args.prompts * 0.9):07d}"
            auth = {"Authorization": f"Bearer {KEY}"}
            cases = [
                ("v1 first page (20)", f"/v1/pairsets/{ps}/prompts", {}),
                ("v1 page at 90% (cursor)", f"/v1/pairsets/{ps}/prompts", {"after": deep}),
                ("v1 grid, 100 per page", f"/v1/pairsets/{ps}/prompts", {"format": "grid", "limit": 100}),
                ("v1 sequence+5 images+edit_distance at 90%", f"/v1/pairsets/{ps}/prompts", {"format": "sequence", "n_images": 5, "outcome": "edit_distance", "after": deep}),
            ]
            print(f"{'case':48s} {'p50 ms':>8s} {'max ms':>8s}")
            for name, path, params in cases:
                p50, worst = _time(client, path, args.repeat, params=params, headers=auth)
                print(f"{name:48s} {p50 * 1000:8.1f} {worst * 1000:8.1f}")
            p50, worst = _time(client, f"/ui/pairsets/{ps}/prompts", args.repeat, params={"format": "grid", "after": deep})
            print(f"{'viewer HTML page (24 grid prompts at 90%)':48s} {p50 * 1000:8.1f} {worst * 1000:8.1f}")
        finally:
            if api is not None:
                api.terminate()
                api.wait(10)
            redis_proc.terminate()
            redis_proc.wait(10)


if __name__ == "__main__":
    main()
