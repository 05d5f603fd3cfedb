"""After training: render prompts as training did, generate with transformers (+ PEFT adapters), serve an
OpenAI-compatible API, evaluate. Heavy libraries (torch, transformers, fastapi) are imported by the modules
that use them, so `megaswift --help` stays fast."""
