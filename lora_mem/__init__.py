"""lora-mem: write a conversation into a LoRA adapter, then answer questions from the weights alone.

    import lora_mem

    lm = lora_mem.load_model("smollm2-135m-instruct")
    chat = lora_mem.read_chat("chat.jsonl")                  # {speaker, text, time} lines, or LoCoMo's layout
    memory = lora_mem.Memory(lm, lora_mem.MemoryConfig(recipe=lora_mem.Recipe("text+queries")))
    result = memory.write(chat.conversation)
    memory.answer(["When did Caroline go to the support group?"])
    lora_mem.save_memory_folder("memories/chat", memory, chat.conversation,
                                lora_mem.new_manifest(memory, chat.conversation, result, chat))

The command line is ``lora-mem`` (``lora-mem --help``; lora_mem.command). Caches live under ``$LORA_MEM_HOME``
(lora_mem.home).
"""

from lora_mem.lora_core.chat_files import ChatFile, SessionSplit, read_chat
from lora_mem.lora_core.conversation import Conversation, ConversationError, Session, Turn
from lora_mem.lora_core.inject import LoRAConfig
from lora_mem.lora_core.memory import AnswerConfig, GrowthConfig, Memory, MemoryConfig, WriteResult
from lora_mem.lora_core.growth import AppendResult, new_memory, open_memory
from lora_mem.lora_core.memory_folder import (MemoryFolder, MemoryFolderError, new_manifest, read_memory_folder,
                                              save_memory_folder)
from lora_mem.lora_core.recipes import Recipe
from lora_mem.lora_core.train import TrainConfig
from lora_mem.model.loader import LoadedModel, load_model

__all__ = [
    "AnswerConfig", "AppendResult", "GrowthConfig", "new_memory", "ChatFile", "Conversation", "ConversationError", "LoRAConfig", "LoadedModel", "Memory",
    "MemoryConfig", "MemoryFolder", "MemoryFolderError", "Recipe", "Session", "SessionSplit", "Turn", "TrainConfig",
    "WriteResult", "load_model", "new_manifest", "open_memory", "read_chat", "read_memory_folder",
    "save_memory_folder",
]
