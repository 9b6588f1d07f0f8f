"""Generation on token ids (never text): KV-cached decoding and sampling."""
