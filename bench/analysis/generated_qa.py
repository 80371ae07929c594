"""QA pairs the base model writes about each turn (what ``--qa-source model`` trains on), with the share that is
grounded and kept (`lora_mem.lora_core.generated_qa`).

    python -m bench.analysis.generated_qa --conversations conv-26 --max-turns 20 --out bench/results/generated_qa_sample.json
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from bench.common import atomic_write_json
from lora_mem.cli import Parser, positive_int
from lora_mem.lora_core.generated_qa import ASSISTANT_START, ONE_SHOT, GenerationSettings, generate_qa


def main(argv: list[str] | None = None) -> dict:
    from bench.locomo_data import iter_samples, load_locomo, resolve_data_path
    from lora_mem.model.loader import load_model

    ap = Parser(prog="python -m bench.analysis.generated_qa",
                                 description="QA pairs the base model writes about each turn (what "
                                             "--qa-source model trains on), with the share that is grounded.")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, local checkpoint dir or hub id")
    ap.add_argument("--data", default=None, help="locomo10.json (else $LOCOMO_DATA, the cache, or a download)")
    ap.add_argument("--conversations", default=None, help="comma-separated sample ids (default: all)")
    ap.add_argument("--max-turns", type=positive_int, default=None, help="first N askable turns of each conversation")
    ap.add_argument("--max-new-tokens", type=positive_int, default=GenerationSettings.max_new_tokens,
                    help="the longest generation per turn, in tokens")
    ap.add_argument("--batch-size", type=positive_int, default=GenerationSettings.batch_size,
                    help="turns decoded at once")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--out", default=None, help="summary JSON (kept share per conversation, example records)")
    args = ap.parse_args(argv)
    data = resolve_data_path(args.data)
    samples = load_locomo(data)
    if args.conversations:
        samples = iter_samples(samples, args.conversations)
    lm = load_model(args.model, device=args.device, progress=False)
    settings = GenerationSettings(args.max_new_tokens, args.batch_size)
    per_conv = {}
    for s in samples:
        g = generate_qa(s, lm, settings, max_turns=args.max_turns, progress=True)
        per_conv[s.sample_id] = {"turns": g.generated, "kept": g.kept, "cache_file": str(g.cache_file),
                                 "records": g.records}
        print(f"[{s.sample_id}] {g.kept} of {g.generated} generated pairs grounded and kept", file=sys.stderr)
    total, kept = sum(c["turns"] for c in per_conv.values()), sum(c["kept"] for c in per_conv.values())
    summary = {"model": lm.name, "data": str(data), "settings": asdict(settings), "max_turns": args.max_turns,
               "prompt": ONE_SHOT, "assistant_start": ASSISTANT_START, "turns": total, "kept": kept,
               "kept_share": kept / total if total else None, "conversations": per_conv}
    if args.out:
        atomic_write_json(Path(args.out), summary)
        print(f"wrote {args.out}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
