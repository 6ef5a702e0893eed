"""The bottom layer: errors, the params models, metric categories and the typed hand-offs
between stages, artifact IO, worker lifetime. Imports nothing else of lmmem."""
