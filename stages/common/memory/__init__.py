"""How memory is measured: the tensor meter (live tensor bytes by category), the process's
peak RSS and its prediction, the peak's timeline, memory-mapped files. Imports only core."""
