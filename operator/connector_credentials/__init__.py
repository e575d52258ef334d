"""connector-credential-operator: AWS Secrets Manager credentials for a controller pod, via IRSA."""

__all__ = ["__version__"]
__version__ = "0.1.0"
