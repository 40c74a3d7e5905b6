"""fasttune.export"""
