"""vdu — machine unlearning in diffusion models (Variational Diffusion Unlearning and
strong-duality constrained unlearning). The mathematics is fixed in docs/mathematics.md."""
__version__ = "0.1.0"
