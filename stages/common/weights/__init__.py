"""Weights as they are stored and loaded: int8/int4 and NF4 quantization, pruning, sparse
storage, model folders. Imports core, memory and modelling."""
