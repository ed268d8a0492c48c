"""The audit pass: feature extraction hooks, the one streaming pass, orchestration, torchrun sharding, the Python API."""
