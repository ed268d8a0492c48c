"""Pure math, no I/O: streaming moments and their one Chan merge, the fold kernels, the NRC conditions and the verdict policy."""
