"""fasttune.kernels"""
