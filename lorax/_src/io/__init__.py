"""Files, all written through one atomic writer (`files`): orbax checkpoints (`checkpoint`) and
their schema and base fingerprints (`records`), PEFT folders (`peft*`), llama.cpp adapters
(`llamacpp`) and per-adapter bank folders (`bank_files`)."""
