"""In-package architectures rebuilt from state dicts (no torchvision dependency)."""
