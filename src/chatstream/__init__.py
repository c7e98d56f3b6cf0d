"""ChatStream: a streaming chat service for Hugging Face causal language models."""
