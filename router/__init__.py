"""The front door: tokenizer, chat template, parsers, policies and servers. No torch here."""
