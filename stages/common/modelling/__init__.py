"""The models and what runs them: the architectures, token windows and the loss, optimizer
helpers, metered generation and the quantized KV cache, the probe. Imports core and memory."""
