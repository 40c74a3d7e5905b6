"""fasttune.data"""
