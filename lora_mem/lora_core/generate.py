"""`python -m lora_mem.model.generate` with LoRA adapters in PEFT format: each adapter answers the prompts in turn.

    python -m lora_mem.lora_core.generate --adapter runs/locomo-r8/adapters/conv-26 \
        --prompt "What did Caroline research?"
"""

from __future__ import annotations

from lora_mem.lora_core.adapter_io import AdapterError, load_adapter
from lora_mem.model.generate import answer_and_print, cli_parser, load_for_cli
from lora_mem.model.generate import cli as run_cli


def main(argv: list[str] | None = None) -> None:
    ap = cli_parser("Greedy chat answers from a Qwen2-family model, optionally with LoRA adapters.",
                    prog="python -m lora_mem.lora_core.generate")
    ap.add_argument("--adapter", action="append", default=[],
                    help="a LoRA adapter directory in PEFT format; repeat to answer with each adapter in turn")
    args = ap.parse_args(argv)
    lm = load_for_cli(args)
    for adapter in args.adapter or [None]:
        if adapter is not None:
            cfg = load_adapter(lm.model, adapter)  # replaces the previous adapter
            print(f"[adapter {adapter}: r={cfg.rank}, alpha={cfg.alpha:g}]")
        answer_and_print(lm, args)


def cli() -> None:
    run_cli(main, errors=(AdapterError,))


if __name__ == "__main__":
    cli()
