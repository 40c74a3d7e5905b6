"""fasttune.infer"""
