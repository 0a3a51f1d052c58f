"""Loading + tokenizing throughput of the streaming blend loader, and its peak memory, for generated JSONL
files of 100k and 1M rows, against a peer in the same script that reads the whole file into memory first
(what `datasets.load_dataset("json")`-style loading without memory mapping amounts to).

    python benchmarks/data_loading.py [--sizes 100000 1000000]

Each measurement runs in a fresh subprocess so peak RSS belongs to it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BATCH = 1024


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_file(path: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"problem": f"Let x = {i}. Compute 3x + {i % 97} and simplify the result "
                                          f"as far as possible for the case x = {i}.", "answer": str(4 * i + i % 97)}) + "\n")


def tokenizer():
    from nemo_prorl.demo.tiny import train_tokenizer

    corpus = [f"Let x = {i}. Compute 3x and simplify the result as far as possible." for i in range(2000)]
    return train_tokenizer(corpus, vocab_size=1000)


def tokenize(tok, records) -> int:
    convs = [list(r.messages) for r in records]
    texts = tok.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
    return sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])


def run_streaming(path: str, n: int) -> dict:
    from nemo_prorl.config.schema import DataConfig, SourceConfig
    from nemo_prorl.data.blend import BlendSource

    tok = tokenizer()
    base = rss_mb()
    t0 = time.perf_counter()
    src = BlendSource(DataConfig(source="blend", blend={"math": SourceConfig(path=path, format="deepscaler")}))
    t_index = time.perf_counter() - t0
    tokens = done = 0
    while done < n:
        batch = src.next_prompts(min(BATCH, n - done))
        tokens += tokenize(tok, batch)
        done += len(batch)
    dt = time.perf_counter() - t0
    return {"rows_per_s": n / dt, "tokens": tokens, "index_s": t_index, "peak_mb": peak_mb(), "base_mb": base}


def run_in_memory(path: str, n: int) -> dict:
    from nemo_prorl.config.schema import PromptFormatConfig
    from nemo_prorl.data.formats import FORMATS, RowContext

    tok = tokenizer()
    base = rss_mb()
    t0 = time.perf_counter()
    with open(path) as f:
        rows = [json.loads(line) for line in f]  # the peer: everything in memory, then shuffled in place
    import random

    random.Random(0).shuffle(rows)
    adapt = FORMATS.get("deepscaler")
    prompt = PromptFormatConfig()
    tokens = 0
    for s in range(0, n, BATCH):
        recs = [adapt(r, RowContext(uid=str(s + k), domain=None, reward=None, prompt=prompt))
                for k, r in enumerate(rows[s:s + BATCH])]
        tokens += tokenize(tok, recs)
    dt = time.perf_counter() - t0
    return {"rows_per_s": n / dt, "tokens": tokens, "index_s": 0.0, "peak_mb": peak_mb(), "base_mb": base}


def child(mode: str, path: str, n: int) -> None:
    out = (run_streaming if mode == "stream" else run_in_memory)(path, n)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores; batches of {BATCH} prompts, chat template + BPE tokenizer")
    print(f"{'rows':>9} {'loader':<10} {'rows/s':>9} {'index s':>8} {'peak RSS MB':>12} {'over base MB':>13} {'file MB':>8}")
    with tempfile.TemporaryDirectory() as d:
        for n in a.sizes:
            path = os.path.join(d, f"math_{n}.jsonl")
            make_file(path, n)
            size_mb = os.path.getsize(path) / 2**20
            res = {}
            for mode in ("stream", "in_memory"):
                r = subprocess.run([sys.executable, __file__, "--child", mode, path, str(n)],
                                   capture_output=True, text=True, check=True)
                res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
                m = res[mode]
                print(f"{n:>9} {mode:<10} {m['rows_per_s']:>9.0f} {m['index_s']:>8.2f} {m['peak_mb']:>12.0f} "
                      f"{m['peak_mb'] - m['base_mb']:>13.0f} {size_mb:>8.0f}")
            assert res["stream"]["tokens"] == res["in_memory"]["tokens"], "both loaders must see the same rows"
            print(f"{'':>9} streaming/in-memory: speed x{res['stream']['rows_per_s'] / res['in_memory']['rows_per_s']:.2f}, "
                  f"memory over base x{(res['stream']['peak_mb'] - res['stream']['base_mb']) / max(res['in_memory']['peak_mb'] - res['in_memory']['base_mb'], 1):.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
