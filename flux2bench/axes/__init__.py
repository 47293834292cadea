"""The axes a setup varies along, one module each; ``flux2bench.axes.registry`` lists them."""
