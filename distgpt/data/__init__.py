"""Data layer: the GPT-2 tokenizer, llm.c-format token shards, and the tool that makes them."""
