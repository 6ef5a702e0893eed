"""What several stages share, in layers; a package imports only from the layers below it
(tests/test_structure.py holds this): core < memory, text < modelling < weights < harness.
A piece only one stage uses lives in that stage's own module or package."""
