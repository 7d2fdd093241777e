"""Where the LLM codec's probabilities come from: model sources, token bytes, fingerprint."""
