"""CUDA kernels compiled at run time through cuda-python, each with a PyTorch reference."""
