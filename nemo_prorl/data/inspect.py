"""`prorl data inspect PATH`: validate a data file row by row and report what training would see: rows
per domain, prompt length percentiles (tokens with --tokenizer, else words), and the rejected rows."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from nemo_prorl.config.schema import DataConfig, SourceConfig
from nemo_prorl.data.blend import SourceStream
from nemo_prorl.data.readers import DataError


@dataclass
class Report:
    path: str
    rows: int = 0
    domains: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    rejects: list[str] = field(default_factory=list)
    unit: str = "words"

    def percentiles(self) -> dict[str, float]:
        if not self.lengths:
            return {}
        a = np.asarray(self.lengths)
        return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p99": float(np.percentile(a, 99)), "max": float(a.max())}

    def render(self, show_rejects: int) -> str:
        ok = sum(self.domains.values())
        lines = [f"{self.path}: {self.rows} rows, {ok} valid, {len(self.rejects)} rejected"]
        for d, n in sorted(self.domains.items()):
            lines.append(f"  {d:<24}{n:>9}")
        if self.lengths:
            p = self.percentiles()
            lines.append(f"prompt length ({self.unit}): " + ", ".join(f"{k} {v:.0f}" for k, v in p.items()))
        if self.rejects:
            lines.append(f"rejected rows (first {min(show_rejects, len(self.rejects))}):")
            lines += [f"  {r}" for r in self.rejects[:show_rejects]]
        return "\n".join(lines)


def inspect_file(path: str, fmt: str = "auto", domain: Optional[str] = None, tokenizer: Any = None,
                 data: Optional[DataConfig] = None) -> Report:
    """Read every row of `path` through the same code training uses; DataError if the file is unreadable."""
    data = data or DataConfig()
    stream = SourceStream("inspect", SourceConfig(path=path, format=fmt, domain=domain), data, data.seed)
    rep = Report(path=path, unit="tokens" if tokenizer is not None else "words")
    for i in range(stream.reader.num_rows):
        rep.rows += 1
        try:
            rec = stream.record(i)
        except DataError as e:
            rep.rejects.append(str(e))
            continue
        rep.domains[rec.domain] += 1
        if tokenizer is not None:
            text = tokenizer.apply_chat_template(list(rec.messages), add_generation_prompt=True, tokenize=False)
            rep.lengths.append(len(tokenizer.encode(text, add_special_tokens=False)))
        else:
            rep.lengths.append(sum(len(m["content"].split()) for m in rec.messages))
    return rep


def add_parser(sub: Any) -> None:
    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    ip = dsub.add_parser("inspect", help="validate a data file and print counts, lengths and rejected rows")
    ip.add_argument("path")
    ip.add_argument("--format", default="auto", help="row format (default: detect from the first row)")
    ip.add_argument("--domain", default=None, help="domain for every row (default: from the rows)")
    ip.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer directory, for token lengths")
    ip.add_argument("--chat-template", default=None, help="force a chat template, e.g. r1_distill")
    ip.add_argument("--show-rejects", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 all rows valid, 1 some rejected, 2 the file cannot be read."""
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        from nemo_prorl.data.templates import apply_chat_template_choice

        tok = apply_chat_template_choice(AutoTokenizer.from_pretrained(args.tokenizer), args.chat_template)
    try:
        rep = inspect_file(args.path, args.format, args.domain, tok)
    except DataError as e:
        print(f"prorl data inspect: {e}")
        return 2
    print(rep.render(args.show_rejects))
    return 1 if rep.rejects else 0
