"""fasttune.train"""
