"""``python -m lora_mem``: the lora-mem command (lora_mem.command)."""

from lora_mem.command import cli

cli()
